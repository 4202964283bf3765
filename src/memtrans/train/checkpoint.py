"""Checkpoints: one atomically written file per run, RUN/checkpoints/latest.pt.

Contents (dict): version, step, tokens, wall_time_s, finished, status, config (resolved dict), model,
optimizer, scheduler, stability (StabilityTracker state), world_size, ranks (per rank: rng {torch, numpy,
python, cuda}, stream (DocumentStream.state_dict), model_state (ModelState.state_dict(): XL caches +
memories)); `rng`, `stream`, `model_state` at top level alias rank 0's.
A save goes through a temporary file + fsync + rename: a crash or a failing save leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from memtrans.utils import atomic_torch_save

CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "latest.pt"


def save_checkpoint(obj: dict, path: str | Path) -> None:
    atomic_torch_save(obj, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its checkpoints/latest.pt), a checkpoints/ dir, or a .pt file."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "latest.pt", p / "latest.pt"):
            if cand.is_file():
                return cand
        raise ValueError(f"{p} holds no checkpoint (looked for checkpoints/latest.pt)")
    if not p.is_file():
        raise ValueError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint; unreadable or truncated files raise a ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {p} is unreadable or corrupt ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} does not hold a dict (got {type(obj).__name__})")
    return obj


def model_weights(ckpt: dict, path: str | Path = "checkpoint") -> dict:
    """The model state_dict in a training checkpoint (or a bare state_dict)."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no model weights")
    return sd


def rng_state(device: torch.device | None = None) -> dict:
    np_state = np.random.get_state()
    d = {"torch": torch.get_rng_state(), "numpy": (np_state[0], np_state[1].copy(), *np_state[2:]),
         "python": random.getstate()}
    if device is not None and device.type == "cuda":
        d["cuda"] = torch.cuda.get_rng_state(device)
    return d


def set_rng_state(d: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(d["torch"])
    np.random.set_state(tuple(d["numpy"]))
    random.setstate(d["python"])
    if device is not None and device.type == "cuda" and "cuda" in d:
        torch.cuda.set_rng_state(d["cuda"], device)


def load_weights_partial(model: torch.nn.Module, sd: dict, source: str = "checkpoint") -> dict:
    """Load matching weights with strict=False (the fine-tuning recipe: new memory/gate parameters stay
    freshly initialised). Any shape mismatch is a ValueError. Returns {missing, unexpected} key lists."""
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"cannot initialise from {source}: parameter shapes differ ({'; '.join(bad[:5])}"
                         f"{'; ...' if len(bad) > 5 else ''})")
    res = model.load_state_dict(sd, strict=False)
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
