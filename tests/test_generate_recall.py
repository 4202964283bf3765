"""Generation with memory on the recall task: a model from the recall recipe (configs/recall_proof/, as in
tests/test_recall_proof.py) reads a held-out document up to a far query's key and writes the bound value.

Every query scored here is far (`memtrans.model.reach.far_distance`, as `memtrans eval` counts them): its
binding lies beyond the model's local reach (segment 32 x (depth 1 + 1) - 1 = 63 tokens), so only the
memory can carry it; the recipe puts every query 100-240 tokens after its binding. With memory the generated value is right far above
chance (0.1), and the entry the memory weighted most is the binding token itself; without memory it is at
chance. Greedy generation must also give exactly the teacher-forced evaluation's far recall (the same
argmax at the same positions). About 35 s on one core, most of it the recipe's training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from memtrans.config import load_config
from memtrans.eval import evaluate
from memtrans.generate import entry_weights, load_model
from memtrans.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "recall_proof"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recall recipe, seed 0: local pretraining without memory, then fine-tuning with / without memory."""
    root = tmp_path_factory.mktemp("genrecall")
    cache = {"data.cache_dir": str(root / "cache")}
    assert train(load_config(CONFIGS / "local.yaml", cache), root / "local", quiet=True)["status"] == "finished"
    out = {}
    for name, layers in (("memory", [0]), ("no_memory", [])):
        cfg = load_config(CONFIGS / "far.yaml", {**cache, "model.memory_layers": layers,
                                                  "train.init_from": str(root / "local")})
        assert train(cfg, root / name, quiet=True)["status"] == "finished"
        out[name] = root / name
    return out


@torch.no_grad()
def generate_far_values(run_dir):
    """Per far query of the run's test split: (generated value right?, binding position, top retrieved
    position or None, prompt tokens, value token). One greedy token after the prompt doc[:query key + 1]."""
    from memtrans.data import prepare_data
    from memtrans.model.reach import far_distance
    model, _, cfg, _ = load_model(run_dir)
    docs = prepare_data(cfg.data, cfg.train.seed).splits["test"]
    far, rows = far_distance(cfg.model.segment_len, cfg.model.depth, cfg.model.xl_cache), []
    for i in range(len(docs)):
        tokens, tags = docs.tokens(i).astype(np.int64), docs.tags(i)
        for p in np.nonzero(tags >= far)[0]:  # tags[p] = distance from the value token p + 1 to its binding
            records = []
            new, _ = model.generate(torch.as_tensor(tokens[:p + 1])[None], None, 1, temperature=0,
                                    retrievals=records if model.cfg.has_memory else None)
            top = entry_weights(records[0][0])[0][0] if records else None
            rows.append((int(new[0, 0]) == tokens[p + 1], int(p + 1 - tags[p]), top, tokens[:p + 1], tokens[p + 1]))
    return rows


@pytest.fixture(scope="module")
def generated(runs):
    return {name: generate_far_values(run) for name, run in runs.items()}


@pytest.mark.slow
def test_memory_model_generates_far_values_and_the_model_without_memory_is_at_chance(runs, generated):
    chance = 0.1
    acc = {}
    for name, rows in generated.items():
        assert len(rows) >= 100
        # the query (the prompt's last token) is further from the binding than the 63-token local reach
        assert all(len(prompt) - 1 - binding > 63 for _, binding, _, prompt, _ in rows)
        acc[name] = np.mean([r[0] for r in rows])
    assert acc["memory"] > chance + 0.3, acc
    assert acc["no_memory"] < chance + 0.1, acc
    assert acc["memory"] > acc["no_memory"] + 0.3, acc
    # generation streams the prompt as training and evaluation do: the same argmax, so the same far recall
    for name, run in runs.items():
        rec = evaluate(run, "test", quiet=True, plots=False)["recall"]
        assert rec["far_tokens"] == len(generated[name])
        assert rec["far_acc"] == pytest.approx(acc[name], abs=1e-12), (name, rec["far_acc"], acc[name])


@pytest.mark.slow
def test_the_memory_retrieves_the_binding_for_far_queries(generated):
    rows = generated["memory"]
    # ~250 entries are stored when a query comes: the binding token on top is not luck
    on_binding = np.mean([top == binding for _, binding, top, _, _ in rows])
    assert on_binding > 0.6, on_binding


@pytest.mark.slow
def test_cli_shows_the_retrieved_binding_for_a_far_query(runs, generated, tmp_path, capsys):
    from memtrans.cli import main
    right, binding, top, prompt, value = next(r for r in generated["memory"] if r[0] and r[2] == r[1])
    path = tmp_path / "prompt.txt"
    path.write_bytes(bytes(prompt.astype(np.uint8)))  # byte tokens: the document's UTF-8 text
    assert main(["generate", str(runs["memory"]), "--prompt-file", str(path), "--max-new-tokens", "1",
                 "--temperature", "0", "--show-retrievals"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == chr(value)  # the bound digit
    first = next(i for i, line in enumerate(out) if line.strip().startswith("@"))
    entry = out[first].split()
    assert entry[0] == f"@{binding}"  # the heaviest entry, at the binding's position in the prompt...
    key, digit = divmod(int(prompt[binding]) - 0x80, 10)  # ...whose token is the binding of the query's key
    assert chr(int(prompt[-1])) == "ABCDEF"[key] and digit == value - ord("0")
    assert f"[{chr(0xC0 + 10 * key + digit)}]" in out[first]  # and it is shown in its context
