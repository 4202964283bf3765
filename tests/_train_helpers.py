"""Tiny configs shared by the training / evaluation tests."""
from __future__ import annotations

from memtrans.config import config_from_dict


def tiny_dict(tmp_path, memory: bool = True, steps: int = 12, **sections) -> dict:
    d = {"model": {"dim": 32, "depth": 2, "heads": 2, "head_dim": 16, "segment_len": 16,
                   "memory_layers": [1] if memory else [], "memory_size": 256, "knn_k": 4,
                   "memory_dtype": "float32", "score_dtype": "float32"},
         "data": {"corpus": "recall", "batch_size": 2, "recall_docs": 12, "recall_doc_len": 160, "recall_pairs": 2,
                  "recall_min_distance": 40, "val_fraction": 0.2, "test_fraction": 0.25,
                  "cache_dir": str(tmp_path / "cache")},
         "optim": {"lr": 3e-3, "warmup_steps": 3},
         "train": {"steps": steps, "precision": "fp32", "device": "cpu", "log_every": 1, "checkpoint_every": 5,
                   "threads": 1},
         "eval": {"batch_size": 2, "position_buckets": [32, 64]}}
    for section, values in sections.items():
        d[section].update(values)
    return d


def tiny_config(tmp_path, memory: bool = True, steps: int = 12, **sections):
    return config_from_dict(tiny_dict(tmp_path, memory, steps, **sections))
