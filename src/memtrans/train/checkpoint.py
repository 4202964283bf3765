"""Checkpoints: RUN/checkpoints/latest.pt, and with several processes one file per rank beside it.

latest.pt (dict): version, step, tokens, wall_time_s, finished, status, config (resolved dict), model,
optimizer, scheduler, stability (StabilityTracker state), grad_scaler, world_size, last_loss, summary (in the
final one), notes, init_from, and
- in one process: ranks = [rank 0's state], where a rank's state is rng {torch, numpy, python, cuda}, stream
  (DocumentStream.state_dict), model_state (ModelState.state_dict(): XL caches + memories); `rng`, `stream`,
  `model_state` at top level alias it;
- with W > 1 processes: rank_files = the names of the W rank files (`rank{r}-step{step}.pt`), each written by
  its own rank and holding that rank's state with its step, rank and world_size. No rank's memories pass
  through another rank. Rank 0 writes latest.pt only once every rank's file is written (the commit), and a
  rank deletes its older files only after that, so a kill at any moment leaves latest.pt and the rank files
  it names consistent.
Every file goes through a temporary file + fsync + rename: a crash or a failing save leaves the previous
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


def rank_file_name(rank: int, step: int) -> str:
    return f"rank{rank}-step{step}.pt"


def remove_rank_files(directory: str | Path, rank: int, keep: str) -> None:
    """Delete rank `rank`'s checkpoint files in `directory` other than `keep` (after latest.pt names `keep`)."""
    for p in Path(directory).glob(f"rank{rank}-step*.pt"):
        if p.name != keep:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def load_rank_state(ckpt: dict, ckpt_file: str | Path, rank: int, world_size: int) -> dict:
    """This rank's state (rng, stream, model_state) of a checkpoint: from its own file when the checkpoint was
    written by several processes (rank_files), else from ckpt["ranks"]. A missing, corrupt or mismatched
    file is a ValueError naming it."""
    ckpt_file = Path(ckpt_file)
    if "rank_files" not in ckpt:
        try:
            return ckpt["ranks"][rank]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"checkpoint {ckpt_file} holds no state for rank {rank}") from None
    names = ckpt["rank_files"]
    if len(names) != world_size:
        raise ValueError(f"checkpoint {ckpt_file} names {len(names)} rank files for {world_size} processes")
    path = ckpt_file.parent / names[rank]
    if not path.is_file():
        raise ValueError(f"{path} is missing: checkpoint {ckpt_file} (step {ckpt.get('step')}) was written by "
                         f"{world_size} processes, each keeping its memories and document slots in its own file "
                         f"beside it; restore that file (copy the whole checkpoints/ directory) or use another "
                         f"--run-dir")
    d = load_checkpoint(path)
    got = (d.get("rank"), d.get("world_size"), d.get("step"))
    if got != (rank, world_size, ckpt.get("step")):
        raise ValueError(f"{path} does not belong to checkpoint {ckpt_file}: it holds rank {got[0]} of "
                         f"{got[1]} at step {got[2]}, expected rank {rank} of {world_size} at step {ckpt.get('step')}")
    return d


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
