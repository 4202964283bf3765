"""Proof that the memory works: far-query recall of a tiny memory model vs the same model without memory.

The paper's fine-tuning recipe at toy scale (configs/recall_proof/): a one-layer model without memory
first learns the key -> value lookup on short `recall` documents where every binding is within segment +
XL cache; then two copies are fine-tuned on documents whose queries lie beyond that reach, one with a kNN
memory at its layer and one without. Only the memory can see the bindings, so the memory model must recall
far values well above chance and the no-memory model must stay at chance (0.1). About 25 s on one core.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from memtrans.config import load_config
from memtrans.eval import evaluate
from memtrans.model.reach import far_distance
from memtrans.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "recall_proof"


@pytest.mark.slow
def test_memory_recalls_beyond_the_local_window(tmp_path):
    local = load_config(CONFIGS / "local.yaml")
    assert train(local, tmp_path / "local", quiet=True)["status"] == "finished"
    near = evaluate(tmp_path / "local", "test", quiet=True, plots=False)["recall"]
    # the lookup exists locally (chance 0.1), so there is something for the memory to extend
    assert near["acc"] > 0.8, near

    far = {}
    for name, layers in (("memory", [0]), ("no_memory", [])):
        cfg = load_config(CONFIGS / "far.yaml", {"model.memory_layers": layers,
                                                   "train.init_from": str(tmp_path / "local")})
        assert train(cfg, tmp_path / name, quiet=True)["status"] == "finished"
        far[name] = evaluate(tmp_path / name, "test", quiet=True, plots=False)["recall"]

    mem, nomem = far["memory"], far["no_memory"]
    for r in (mem, nomem):  # every scored query is beyond the one-layer model's local reach (63 tokens)
        assert r["far_tokens"] == r["tokens"] >= 100 and r["far_min_distance"] == far_distance(32, 1) == 64 + 1
    chance = mem["chance"]
    assert chance == 0.1
    assert nomem["far_acc"] < chance + 0.1, (nomem["far_acc"], "a model without memory cannot see the bindings")
    assert mem["far_acc"] > chance + 0.3, mem["far_acc"]
    assert mem["far_acc"] > nomem["far_acc"] + 0.3, (mem["far_acc"], nomem["far_acc"])
