"""Experiment: can a tiny memory model learn to recall values bound more than two segments back?

    python benchmarks/recall_proof.py [--seed 0]

Prints far-query recall accuracy of a memory and a no-memory model trained with the recipe below. This is
the intended proof that the memory works; it is a script, not a test, because it does not succeed yet
(see STATUS) and a test that is expected to fail would assert nothing.

Recipe (the paper's fine-tuning recipe, scaled down to run in about a minute on one CPU core):
1. pre-train each model for a few hundred steps on `recall` documents that fit in one segment, so local
   attention learns to find the bound value and copy it (keys written to memory are detached, so only local
   attention can teach the memory layer's key projection what to look for);
2. continue from that checkpoint (train.init_from) on documents whose queries lie >= 140 tokens after their
   bindings, beyond the 2 x 64-token reach of segment + XL cache; only the memory can see them;
3. evaluate far-query recall on held-out documents: memory model >> no-memory model ~ chance (0.1).

STATUS (2026-11-28): the memory model does NOT beat the no-memory model yet: phase 1 learns the local lookup
(recall 0.34-0.39 vs chance 0.1) but phase 2 gives far recall at chance for both models (0.07-0.11): the local
lookup is apparently solved with the relative-position bias (fixed layout, short distances) rather than by
content, and memory attention has no position bias, so nothing transfers; learning a content lookup from
scratch on far-only data did not happen within ~3000 steps either (memory keys are detached, so only local
attention trains the key projection, and far-only documents give it no signal).

Further attempts (standalone scripts, dim 64, depth 2, memory at layer 1, up to 6000 steps): bindings
"vK"/"Kv"/"vKv" with queries "?Kv" at log-uniform distances, learning rates 3e-3..1e-2, k 8..64, dense and
far-only documents, space or letter filler: near recall reached 0.24-0.36, far recall stayed 0.06-0.14 in
every variant. Diagnosis: for far queries the binding was in the retrieved top-k of the best head for
~50-77% of queries late in training, but the learned qk scale fell to 1.2-2.5 (near-uniform softmax over
the k retrieved entries) and the gates to 0.05-0.3, so the right value is averaged away; while retrieval
returns only filler, queries get no useful gradient (top-k is not differentiable in what it leaves out).

Scored tokens are upweighted in the loss (train.tagged_loss_weight) because a 64-dim model on a plain LM
loss over random filler does not learn the lookup in a CPU-test budget (see the report in the commit).
"""
import argparse
import copy
import tempfile
from pathlib import Path

from memtrans.config import config_from_dict
from memtrans.eval import evaluate
from memtrans.train import train

BASE = {
    "model": {"dim": 64, "depth": 2, "heads": 4, "head_dim": 16, "segment_len": 64, "memory_layers": [1],
              "memory_size": 512, "knn_k": 8, "memory_dtype": "float32", "score_dtype": "float32",
              "rel_pos_max_distance": 64},
    "data": {"corpus": "recall", "batch_size": 8, "recall_docs": 2000, "recall_pairs": 1, "recall_key_len": 1,
             "recall_value_len": 4, "val_fraction": 0.02, "test_fraction": 0.03},
    "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.0},
    "train": {"precision": "fp32", "device": "cpu", "log_every": 50, "checkpoint_every": 0, "threads": 1,
              "tagged_loss_weight": 10.0, "seed": 0},
    "eval": {"batch_size": 8, "max_docs": 48},
}
LOCAL = {"data": {"recall_doc_len": 64, "recall_min_distance": 4}, "train": {"steps": 800}}
FAR = {"data": {"recall_doc_len": 256, "recall_min_distance": 140}, "train": {"steps": 200},
       "optim": {"warmup_steps": 10, "lr": 1e-3}}


def make(tmp_path, memory: bool, phase: dict, init_from=None):
    d = copy.deepcopy(BASE)
    for section, values in phase.items():
        d[section].update(values)
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    if not memory:
        d["model"]["memory_layers"] = []
    if init_from:
        d["train"]["init_from"] = str(init_from)
    return config_from_dict(d)


def main(tmp_path: Path, seed: int = 0) -> dict:
    BASE["train"]["seed"] = seed
    far_acc = {}
    for memory in (True, False):
        name = "mem" if memory else "nomem"
        train(make(tmp_path, memory, LOCAL), tmp_path / f"{name}-local", quiet=True)
        s = train(make(tmp_path, memory, FAR, init_from=tmp_path / f"{name}-local"), tmp_path / f"{name}-far",
                  quiet=True)
        if s["status"] != "finished":
            raise SystemExit(f"training {name} ended with status {s['status']}")
        r = evaluate(tmp_path / f"{name}-far", "test", quiet=True, plots=False)
        if not r["recall"]["far_tokens"] == r["recall"]["tokens"] > 100:
            raise SystemExit("evaluation scored too few far queries; the data settings are off")
        far_acc[name] = r["recall"]["far_acc"]
        chance = r["recall"]["chance"]
    print(f"{'model':<10} {'far-query recall acc':>22}")
    for name, acc in far_acc.items():
        print(f"{name:<10} {acc:>22.3f}")
    print(f"{'chance':<10} {chance:>22.3f}")
    print("memory clearly above no-memory and chance (+0.15):",
          far_acc["mem"] > chance + 0.15 and far_acc["mem"] > far_acc["nomem"] + 0.15)
    return far_acc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        main(Path(d), args.seed)
