"""Training: `memtrans train --config FILE.yaml [--set key=value ...] [--run-dir DIR] [--resume] [--init-from RUN]`.

One segment per step: the stream's B document slots advance by `segment_len` tokens, the model's XL caches
and memories carry from step to step (reset per slot when a new document starts), and the loss is the
mean cross-entropy over the batch's `loss_mask`. See docs/CONTRACTS.md for the run-directory format.

No host synchronisation in a step on a GPU: the token count comes from the host copy of the batch (copied to
the device from pinned memory without blocking), and each step's loss and gradient norm stay device tensors
until a read step (a `train.log_every` step, a checkpoint, a budget stop, the last step), where they are read
in one transfer and fed to the stability tracker in order, so metrics.jsonl and the summary are those of
reading every step. The read comes before that step's update; a divergence (non-finite or exploding loss)
is reported at the step it happened, but found at the next read, so the steps between it and the read have
updated the weights (a note in the summary says so; `train.log_every: 1` reads every step, as before). With
fp16 the gradient scaler reads its overflow flag every step (inside torch; an overflow is a skipped step, not a
divergence). With several processes losses and token counts are all-reduced at the reads too; only a
`train.budget_*` makes every step all-reduce and read the stop decision (and the token count, for tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from memtrans.config import Config, config_from_dict, load_config, save_config
from memtrans.device import autocast_context, grad_scaler, policy_of, resolve_config, resolve_device
from memtrans.train import distributed as D
from memtrans.train.checkpoint import (CHECKPOINT_VERSION, checkpoint_path, load_checkpoint, load_rank_state,
                                       load_weights_partial, model_weights, rank_file_name, remove_rank_files,
                                       resolve_checkpoint, rng_state, save_checkpoint, set_rng_state)
from memtrans.train.optim import build_optimizer, build_scheduler
from memtrans.train.stability import StabilityTracker
from memtrans.utils import (DirLock, Interrupted, atomic_write_json, clean_stale_tmp, kill_at, read_json,
                            stale_lock_note)

TERMINAL = ("finished", "diverged")
# Config keys that may change between an interrupted run and its resumption (length, budgets, logging,
# hardware); anything else differing from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("train.steps", "train.budget_minutes", "train.budget_tokens", "train.log_every",
                     "train.checkpoint_every", "train.tensorboard", "train.threads", "train.device",
                     "train.compile", "train.init_from")


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, tags: torch.Tensor | None = None,
                tagged_weight: float = 1.0, num_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over `mask` (0 with a graph when nothing is masked in); with `tagged_weight` != 1,
    a weighted mean in which tokens with tags >= 0 count `tagged_weight` times. `num_tokens`: the mask's count
    when the caller knows it (the trainer counts the host copy of the mask, so a device mask is never read)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    m = mask.reshape(-1).to(nll.dtype)
    n = int(mask.sum()) if num_tokens is None else num_tokens
    if tags is not None and tagged_weight != 1.0:
        m = m * torch.where(tags.reshape(-1) >= 0, tagged_weight, 1.0).to(nll.dtype)
        return (nll * m).sum() / m.sum().clamp(min=1e-9), n
    return (nll * m).sum() / max(n, 1), n


def to_device(batch, device: torch.device):
    """The stream's batch on `device`. On CUDA it goes through pinned memory with non_blocking=True: the host
    does not wait for the copy, which the stream orders before the step's kernels; on CPU it is the batch."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl with step <= `step` (and drop a torn last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    from memtrans.utils import atomic_write_text
    atomic_write_text(path, "".join(s + "\n" for s in keep))


class Tensorboard:
    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as e:  # optional dependency
                print(f"memtrans train: tensorboard disabled ({e})", file=sys.stderr)

    def log(self, rec: dict) -> None:
        if self.writer is not None:
            for k in ("loss", "grad_norm", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{k}", rec[k], rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or not sys.stderr.isatty(),
                unit="step", dynamic_ncols=True, desc="train")


def train(cfg: Config, run_dir: str | Path, resume: bool = True, quiet: bool = False,
          on_step: Callable[[int], None] | None = None, retrain: bool = False) -> dict:
    """Train `cfg` into `run_dir` (see module docstring). Returns the summary dict.

    resume=True continues from run_dir/checkpoints/latest.pt when it exists; resume=False refuses a run dir
    that already holds a checkpoint. A run directory is one run: a finished (or diverged) run is never trained
    again or changed (see `_finished_run`): with its checkpoint it returns at once, without it it is refused
    unless retrain=True, and a config that differs from it is always refused.
    A diverged run ends normally with status `diverged`; an escaping exception sets status `failed`
    (`interrupted` for SIGTERM / SIGINT). `on_step(step)` is called after every completed step (tests use it
    to simulate a crash). The run directory is locked (RUN/.lock) while training writes into it.
    """
    run_dir = Path(run_dir)
    check_values(cfg)
    device = resolve_device(cfg.train.device)
    cfg = resolve_run_config(cfg, run_dir, device)
    ctx = D.init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    main_rank = ctx.is_main
    ckpt_file = checkpoint_path(run_dir)
    status_file = run_dir / "status.json"
    say = (lambda *a: print(*a, flush=True)) if main_rank and not quiet else (lambda *a: None)
    say(f"memtrans train: {policy_of(cfg, device).describe()}")
    lock = None
    try:
        # A finished run needs no writes (and no lock): a read-only results directory answers at once.
        done = _finished_run(cfg, run_dir, ckpt_file, resume, retrain, say, main_rank, write=False)
        if done is not None:
            return done
        if main_rank:
            lock = DirLock(run_dir, ".lock", "run directory").acquire()
            note = stale_lock_note(lock)
            if note:
                say(f"memtrans train: {note}")
            removed = clean_stale_tmp(ckpt_file.parent) + clean_stale_tmp(run_dir, names=TRAINER_FILES)
            removed += clean_stale_tmp(run_dir, min_age_s=3600)  # other writers' (eval), when surely dead
            if removed:
                say(f"memtrans train: removed {len(removed)} temporary file(s) of interrupted writes "
                    f"({', '.join(p.name for p in removed[:3])}{', ...' if len(removed) > 3 else ''})")
        # again under the lock: another process may have finished the run meanwhile; this one may write
        done = _finished_run(cfg, run_dir, ckpt_file, resume, retrain, say, main_rank, write=True)
        if done is not None:
            return done
        return _train(cfg, run_dir, ctx, device, ckpt_file, say, quiet, on_step)
    finally:
        if lock is not None:
            lock.release()
        D.shutdown(ctx)


# Files the trainer writes in RUN/ (their stale temporaries are removed on the next start).
TRAINER_FILES = ("config.yaml", "status.json", "summary.json", "metrics.jsonl")
# Fields that may differ from a finished run's config without making it another run: hardware and speed
# (results are the same), eval.* (evaluation settings), and model.vocab_size (taken from the tokenizer,
# which the data fields decide).
FINISHED_RUN_FREE = ("train.threads", "train.device", "train.compile", "train.tensorboard", "model.vocab_size")
# What a retrain moves aside into RUN/previous/<time>/ (status.json last: until then the run stays finished).
RESULT_FILES = ("eval*.json", "plots", "tensorboard", "metrics.jsonl", "summary.json", "error.txt", "status.json")


def terminal_state(run_dir: Path) -> tuple[str | None, dict | None]:
    """(status, summary) of a run whose training ended (finished or diverged), else (None, None).

    status.json says so, or summary.json does (it is written only at the end of a run, and status.json may
    say `failed` or `interrupted` where the ablation runner recorded a failed evaluation or a stop)."""
    summary = read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    status = (read_json(run_dir / "status.json") or {}).get("status")
    if status in TERMINAL:
        return status, summary
    if summary is not None and summary.get("status") in TERMINAL:
        return summary["status"], summary
    return None, None


def recorded_differences(cfg: Config, run_dir: Path, free: tuple[str, ...] = FINISHED_RUN_FREE) -> list[str]:
    """`field: recorded -> given` for each field of `cfg` that differs from RUN/config.yaml (ignoring `free`
    and eval.*). A missing or unreadable config.yaml is a ValueError: the run cannot be checked."""
    import yaml

    saved = run_dir / "config.yaml"
    try:
        recorded = config_from_dict(yaml.safe_load(saved.read_text()) or {}).to_dict()
    except FileNotFoundError:
        raise ValueError(f"{saved} is missing, so {run_dir} cannot be checked against this config; restore it "
                         f"or use another --run-dir") from None
    except (yaml.YAMLError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{saved} is unreadable ({str(e).splitlines()[0][:200]}); restore it or use another "
                         f"--run-dir") from None
    a, b = _flatten(recorded), _flatten(cfg.to_dict())
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in config_differences(recorded, cfg.to_dict())
            if k not in free and not k.startswith("eval.")]


def _finished_run(cfg: Config, run_dir: Path, ckpt_file: Path, resume: bool, retrain: bool, say, main_rank: bool,
                  write: bool) -> dict | None:
    """The guard of finished runs. Returns the run's summary when there is nothing to do, None when training
    goes on (an unfinished run, or a retrain). With write=False it never writes and returns None where a
    write would be needed (the caller takes the lock and asks again with write=True)."""
    status, summary = terminal_state(run_dir)
    if status is None:
        if ckpt_file.exists() and not resume:
            raise ValueError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose "
                             f"another --run-dir (nothing is deleted)")
        return None
    step = (summary or {}).get("steps", (read_json(run_dir / "status.json") or {}).get("step"))
    diff = recorded_differences(cfg, run_dir)
    if diff:
        raise ValueError(f"{run_dir} is a {status} run (step {step}) with another config: {'; '.join(diff)}. "
                         f"A finished run is never trained again with a different config; nothing was changed. "
                         f"Use another --run-dir (without one, the run goes to runs/<config hash>)")
    if ckpt_file.exists():
        if not resume:
            raise ValueError(f"{run_dir} already {status} at step {step} and holds its checkpoint; nothing was "
                             f"changed. Choose another --run-dir for a new run (--resume would return at once)")
        if summary is None:
            return None  # finished but summary.json lost: _train completes it from the checkpoint
        if (read_json(run_dir / "status.json") or {}).get("status") != status:
            if not write:
                return None
            if main_rank:  # status.json was overwritten (e.g. a failed evaluation) or the kill came before it
                atomic_write_json(run_dir / "status.json", _status_record(summary))
        say(f"memtrans train: {run_dir} already {status} at step {step}; nothing to do")
        return summary
    if not retrain:
        raise ValueError(f"{run_dir} already {status} at step {step}, but its checkpoint {ckpt_file} is gone, so it "
                         f"can be neither resumed nor evaluated again; nothing was changed. To train it again from "
                         f"scratch pass --retrain (its results move to {run_dir}/previous/<time>/), or use another "
                         f"--run-dir")
    if not write:
        return None
    if main_rank:
        dest = archive_results(run_dir)
        say(f"memtrans train: --retrain: the previous results of {run_dir} moved to {dest}; training from scratch")
    return None


def _status_record(summary: dict) -> dict:
    return {"status": summary["status"], "step": summary["steps"], "error": None,
            "wall_time_s": round(float(summary["wall_time_s"]), 3)}


def archive_results(run_dir: Path) -> Path:
    """Move a finished run's results into RUN/previous/<time>/ (nothing is deleted); returns that directory."""
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for pattern in RESULT_FILES:
        for p in sorted(run_dir.glob(pattern)):
            os.replace(p, dest / p.name)
    return dest


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {value!r} is not allowed; {allowed} (e.g. --set {field}=...)")


def check_values(cfg: Config) -> None:
    """Values the config's types allow but training cannot use: a ValueError naming the field and what is
    allowed. (Choices and model sizes are checked by memtrans.config.)"""
    t, o = cfg.train, cfg.optim

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)
    _check(t.steps >= 1, "train.steps", t.steps, "it must be a positive number of steps")
    _check(t.seed >= 0, "train.seed", t.seed, "it must be >= 0")
    _check(t.log_every >= 0, "train.log_every", t.log_every, "it must be >= 0 (0 or 1: every step)")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every,
           "it must be >= 0 (0: only at the end)")
    _check(t.threads is None or t.threads >= 1, "train.threads", t.threads, "it must be >= 1, or null for torch's default")
    _check(t.budget_minutes is None or (finite(t.budget_minutes) and t.budget_minutes > 0), "train.budget_minutes",
           t.budget_minutes, "it must be a positive number of minutes, or null")
    _check(t.budget_tokens is None or t.budget_tokens >= 1, "train.budget_tokens", t.budget_tokens,
           "it must be a positive number of tokens, or null")
    _check(t.spike_window >= 1, "train.spike_window", t.spike_window, "it must be >= 1")
    for name in ("spike_factor", "divergence_factor"):
        v = getattr(t, name)
        _check(finite(v) and v > 0, f"train.{name}", v, "it must be a positive number")
    _check(finite(t.tagged_loss_weight) and t.tagged_loss_weight >= 0, "train.tagged_loss_weight",
           t.tagged_loss_weight, "it must be a number >= 0")
    _check(finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "it must be a positive number")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "it must be >= 0")
    for name in ("weight_decay", "grad_clip"):
        v = getattr(o, name)
        _check(finite(v) and v >= 0, f"optim.{name}", v, "it must be a number >= 0 (0: off)")
    _check(finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio,
           "it must lie in [0, 1]")
    _check(len(o.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
           "it must be two numbers in [0, 1)")
    _check(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "it must be >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "it must be >= 1")


def resolve_run_config(cfg: Config, run_dir: Path, device: torch.device) -> Config:
    """`cfg` with the precision policy's `auto` fields resolved (memtrans.device); a run directory that already
    records them (a resumed run) keeps its own values, so resuming on another machine does not change dtypes."""
    recorded = None
    saved = run_dir / "config.yaml"
    if saved.is_file():
        import yaml
        try:
            d = yaml.safe_load(saved.read_text()) or {}
            recorded = {"train.precision": d.get("train", {}).get("precision"),
                        "model.memory_dtype": d.get("model", {}).get("memory_dtype"),
                        "model.score_dtype": d.get("model", {}).get("score_dtype")}
        except (yaml.YAMLError, AttributeError):
            recorded = None  # an unreadable config.yaml is reported by the resume check below
    return resolve_config(cfg, device, recorded)


def _train(cfg: Config, run_dir: Path, ctx: D.DistContext, device: torch.device, ckpt_file: Path, say, quiet,
           on_step=None) -> dict:
    from memtrans.data import DocumentStream, prepare_data
    from memtrans.model import MemorizingTransformer

    main_rank = ctx.is_main
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(int(tc.threads))
    # Data first (rank 0 fills the token cache, the others then read it).
    if main_rank:
        bundle = prepare_data(cfg.data, tc.seed)
    D.barrier(ctx)
    if not main_rank:
        bundle = prepare_data(cfg.data, tc.seed)
    notes = []
    if cfg.model.vocab_size != bundle.vocab_size:
        notes.append(f"model.vocab_size set from the tokenizer: {cfg.model.vocab_size} -> {bundle.vocab_size}")
        say(f"memtrans train: note: {notes[-1]}")
        cfg.model.vocab_size = bundle.vocab_size
    if "train" not in bundle.splits or len(bundle.splits["train"]) == 0:
        raise ValueError(f"the training split of corpus {cfg.data.corpus!r} is empty")

    ckpt = load_checkpoint(ckpt_file) if ckpt_file.exists() else None
    if ckpt is not None:
        diff = [k for k in config_differences(ckpt.get("config", {}), cfg.to_dict()) if k not in RESUMABLE_CHANGES
                and not k.startswith("eval.")]
        if diff:
            raise ValueError(f"cannot resume {run_dir}: the config differs from the checkpoint's in {', '.join(diff)}")
        if ckpt.get("world_size", 1) != ctx.world_size:
            w = ckpt.get("world_size", 1)
            raise ValueError(f"cannot resume {run_dir}: its checkpoint was written by {w} process(es), this run has "
                             f"{ctx.world_size}; each process kept its own memories and document slots, so resume "
                             f"with the same number ({'torchrun --nproc_per_node=' + str(w) + ' ...' if w > 1 else 'without torchrun'})")
        if ckpt.get("finished") and isinstance(ckpt.get("summary"), dict):
            # killed after the final checkpoint, before summary.json / status.json: write what that run wrote
            summary = ckpt["summary"]
            if main_rank:
                atomic_write_json(run_dir / "summary.json", summary)
                atomic_write_json(run_dir / "status.json", _status_record(summary))
            say(f"memtrans train: {run_dir} had {summary['status']} at step {summary['steps']} (stopped before its "
                f"summary was written); summary.json and status.json written from its final checkpoint")
            return summary

    torch.manual_seed(tc.seed)
    model = MemorizingTransformer(cfg.model).to(device)
    init_info = None
    if ckpt is None and tc.init_from:
        src = resolve_checkpoint(tc.init_from)
        init_info = load_weights_partial(model, model_weights(load_checkpoint(src), src), str(src))
        init_info["source"] = str(src)
        say(f"memtrans train: initialised from {src}; fresh (missing) parameters: {init_info['missing'] or 'none'}; "
            f"ignored (unexpected): {init_info['unexpected'] or 'none'}")
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
    B, T = cfg.data.batch_size, cfg.model.segment_len
    stream = DocumentStream(bundle.splits["train"], B, T, seed=tc.seed, loop=True, rank=ctx.rank,
                            world_size=ctx.world_size)
    state = model.init_state(B)
    scaler = grad_scaler(tc.precision, device)  # fp16 only
    # with a scaler, an inf gradient norm on a finite loss is an overflow that scaler.step skips, not a divergence
    tracker = StabilityTracker(cfg.optim.warmup_steps, tc.spike_window, tc.spike_factor, tc.divergence_factor,
                               cfg.optim.grad_clip, scaled=scaler is not None)
    torch.manual_seed(tc.seed * 1000 + ctx.rank + 1)  # per-rank RNG for dropout
    random.seed(tc.seed * 1000 + ctx.rank + 1)  # and the others, so that a run's RNG state is its own
    np.random.seed(tc.seed * 1000 + ctx.rank + 1)
    step, tokens, wall_before = 0, 0, 0.0
    last_loss = None
    scaler_state = None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler_state = ckpt.get("grad_scaler")
            tracker.load_state_dict(ckpt["stability"])
        except (KeyError, RuntimeError, IndexError) as e:
            raise ValueError(f"checkpoint {ckpt_file} does not fit this run ({type(e).__name__}: {str(e)[:300]})") from None
        # this rank's own slots, caches and memories (its own file with several processes); a failure on one
        # rank stops every rank, with that rank's message
        error, mine = None, None
        try:
            mine = load_rank_state(ckpt, ckpt_file, ctx.rank, ctx.world_size)
            try:
                stream.load_state_dict(mine["stream"])
                state = model.load_state(mine["model_state"], B)
            except (KeyError, RuntimeError, IndexError) as e:
                raise ValueError(f"checkpoint {ckpt_file} (rank {ctx.rank}) does not fit this run "
                                 f"({type(e).__name__}: {str(e)[:300]})") from None
        except ValueError as e:
            error = e
        D.any_failed(error, ctx, device, "to load its part of the checkpoint")
        set_rng_state(mine["rng"], device)
        step, tokens, wall_before = int(ckpt["step"]), int(ckpt["tokens"]), float(ckpt.get("wall_time_s", 0.0))
        last_loss = ckpt["last_loss"] if "last_loss" in ckpt else _logged_loss(run_dir / "metrics.jsonl", step)
        init_info = ckpt.get("init_from")
        notes = list(dict.fromkeys(ckpt.get("notes", []) + notes))
        say(f"memtrans train: resuming {run_dir} at step {step} ({tokens} tokens)")
    del ckpt
    # Several processes: DDP averages gradients during backward (D.wrap_model). torch.compile fuses the dense
    # parts; the memory path is excluded (Attention._with_memory).
    step_module = D.wrap_model(model, ctx)
    forward = torch.compile(step_module) if tc.compile else step_module

    metrics_file = run_dir / "metrics.jsonl"
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        truncate_metrics(metrics_file, step)
    start = time.time()

    def wall() -> float:
        return wall_before + time.time() - start

    def write_status(status: str, error: str | None = None) -> None:
        if main_rank:
            atomic_write_json(run_dir / "status.json", {"status": status, "step": step, "error": error,
                                                         "wall_time_s": round(wall(), 3)})

    def checkpoint(finished: bool, status: str, summary: dict | None = None) -> None:
        """Save the run (see train/checkpoint.py). With several processes every rank writes its own state to
        its own file, then rank 0 writes latest.pt naming those files (the commit), then each rank removes its
        older files; a failure on any rank stops all of them, the previous checkpoint intact."""
        mine = {"rng": rng_state(device), "stream": stream.state_dict(), "model_state": state.state_dict()}

        def shared() -> dict:
            return {"version": CHECKPOINT_VERSION, "step": step, "tokens": tokens, "wall_time_s": wall(),
                    "finished": finished, "status": status, "config": cfg.to_dict(),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "stability": tracker.state_dict(),
                    "grad_scaler": None if scaler is None else scaler.state_dict(),
                    "world_size": ctx.world_size, "init_from": init_info, "notes": notes, "last_loss": last_loss,
                    "summary": summary}
        if not ctx.enabled:
            save_checkpoint({**shared(), "ranks": [mine], **mine}, ckpt_file)
            return
        name = rank_file_name(ctx.rank, step)
        error = None
        try:
            save_checkpoint({"version": CHECKPOINT_VERSION, "step": step, "rank": ctx.rank,
                             "world_size": ctx.world_size, **mine}, ckpt_file.parent / name)
        except OSError as e:
            error = e
        D.any_failed(error, ctx, device, f"to write its checkpoint file for step {step}")
        kill_at(f"rank_files_written_{step}")
        if main_rank:
            try:
                save_checkpoint({**shared(), "rank_files": [rank_file_name(r, step) for r in range(ctx.world_size)]},
                                ckpt_file)
            except OSError as e:
                error = e
        D.any_failed(error, ctx, device, f"to write {ckpt_file}")
        remove_rank_files(ckpt_file.parent, ctx.rank, keep=name)

    def end_summary() -> dict:
        checksums = D.gather_objects(D.param_checksum(model), ctx) if ctx.enabled else None
        w = wall()
        stab = tracker.summary()
        summary = {"status": final_status, "steps": step, "tokens": tokens, "final_loss": last_loss,
                   "loss_spikes": stab["loss_spikes"], "grad_spikes": stab["grad_spikes"],
                   "clipped_fraction": stab["clipped_fraction"], "diverged": stab["diverged"],
                   "diverged_step": stab["diverged_step"], "diverged_reason": stab["diverged_reason"],
                   "loss_spike_steps": stab["loss_spike_steps"], "grad_spike_steps": stab["grad_spike_steps"],
                   "reference_loss": stab["reference_loss"],
                   "tokens_per_s": tokens / w if w > 0 else 0.0, "wall_time_s": w, "params": n_params,
                   "budget_hit": budget_hit, "world_size": ctx.world_size, "device": str(device),
                   "precision": tc.precision, "init_from": init_info, "notes": notes}
        if checksums is not None:
            summary["rank_param_checksums"] = checksums
        if scaler is not None:
            summary["overflow_steps"] = stab["overflows"]  # fp16 steps the gradient scaler skipped
        return summary

    write_status("running")
    tb = Tensorboard(run_dir, tc.tensorboard and main_rank)
    bar = _progress(tc.steps, step, main_rank and not quiet)
    metrics = JsonLines(metrics_file) if main_rank else None
    amp = autocast_context(tc.precision, device)
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip and cfg.optim.grad_clip > 0 else math.inf
    budget_hit = None
    final_status = "finished"
    every = max(1, tc.log_every)
    # Steps whose loss and gradient norm are still device tensors: (step, lr, token count, loss, grad norm).
    # They are read on the host together at the next read step: a log step, a checkpoint step, a budget stop
    # or the last step; `tokens` counts the steps read. With several processes the token counts are summed
    # over the ranks then too, unless a token budget needs the global count at every step.
    pending: list[tuple] = []
    sum_each_step = ctx.enabled and tc.budget_tokens is not None
    budgeted = tc.budget_tokens is not None or tc.budget_minutes is not None
    logged_tokens, interval_start = tokens, time.time()

    def read_pending() -> bool:
        """Read the pending steps' values on the host (one transfer), feed them to the tracker in order and write
        the records of their log steps: the tracker, metrics.jsonl and the summary see exactly what reading every
        step would show. True when one of them diverged: step, tokens and last_loss then stop at that step."""
        nonlocal step, tokens, last_loss, final_status, logged_tokens, interval_start
        values = torch.stack([t.detach().to(torch.float64) for p in pending for t in p[3:]]).tolist()
        losses = D.mean_scalars(values[0::2], ctx, device)
        norms = values[1::2]
        counts = [p[2] for p in pending]
        if ctx.enabled and not sum_each_step:
            counts = [int(c) for c in D.sum_scalars([float(c) for c in counts], ctx, device)]
        read_at, now = pending[-1][0], time.time()
        entries = pending.copy()
        pending.clear()
        for (s, lr, _, _, _), n_tok, loss_value, grad_norm in zip(entries, counts, losses, norms):
            flags = tracker.update(s, loss_value, grad_norm)
            if flags["diverged"]:
                step, final_status = s, "diverged"
                say(f"memtrans train: diverged: {flags['reason']}")
                if s < read_at:
                    notes.append(f"diverged at step {s}, read at step {read_at} (train.log_every={tc.log_every}): "
                                 f"the final checkpoint's weights have the updates of steps {s}..{read_at - 1}")
                if main_rank:
                    metrics.write({"step": s, "loss": loss_value, "grad_norm": grad_norm, "lr": lr,
                                   "tokens": tokens, "tokens_per_s": 0.0, "clipped": False, "time": round(wall(), 3),
                                   "diverged": True})
                return True
            last_loss = loss_value
            tokens += n_tok
            if s % every == 0 or s == tc.steps:
                tps = (tokens - logged_tokens) / max(now - interval_start, 1e-9)
                logged_tokens, interval_start = tokens, now
                rec = {"step": s, "loss": loss_value, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                       "tokens_per_s": round(tps, 2), "clipped": bool(flags["clipped"]), "time": round(wall(), 3)}
                if flags["loss_spike"] or flags["grad_spike"]:
                    rec.update(loss_spike=flags["loss_spike"], grad_spike=flags["grad_spike"])
                if main_rank:
                    metrics.write(rec)
                    tb.log(rec)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}")
        return False

    try:
        model.train()
        while step < tc.steps:
            s = step + 1
            batch = next(stream)
            model.reset_state(state, batch.new_doc)
            n_tok = batch.num_tokens  # read on the host: the stream's batch lives there until copied
            batch = to_device(batch, device)
            with amp:
                logits, state = forward(batch.tokens, state)
            loss, _ = masked_loss(logits, batch.targets, batch.loss_mask, batch.tags, tc.tagged_loss_weight,
                                  num_tokens=n_tok)
            (loss if scaler is None else scaler.scale(loss)).backward()  # DDP all-reduces during it
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # a device tensor, read at the next read step
            if sum_each_step:
                n_tok = int(D.sum_scalars([float(n_tok)], ctx, device)[0])
            pending.append((s, scheduler.get_last_lr()[0], n_tok, loss.detach(), grad_norm))
            stop = None
            if tc.budget_tokens is not None and tokens + sum(p[2] for p in pending) >= tc.budget_tokens:
                stop = f"budget_tokens ({tc.budget_tokens})"
            elif tc.budget_minutes is not None and wall() >= tc.budget_minutes * 60:
                stop = f"budget_minutes ({tc.budget_minutes})"
            stop_all = budgeted and D.any_flag(stop is not None, ctx, device)  # every rank has the same budgets
            checkpoint_due = bool(tc.checkpoint_every) and s % tc.checkpoint_every == 0 and s < tc.steps
            # The read comes before this step's update: a divergence at this very step leaves the weights before it.
            if (s % every == 0 or s == tc.steps or stop_all or checkpoint_due) and read_pending():
                optimizer.zero_grad(set_to_none=True)
                break
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed (reads found_inf: a sync)
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = s
            bar.update(1)
            if stop_all:
                budget_hit = stop or "budget (another rank)"
                say(f"memtrans train: stopping at step {step}: {budget_hit} reached")
                break
            if checkpoint_due:
                checkpoint(False, "running")
                write_status("running")
            if on_step is not None:
                on_step(step)
            kill_at(f"after_step_{step}")
        # The end of a run, in an order that a kill at any moment cannot spoil: the final checkpoint holds the
        # summary, so a run killed before summary.json or status.json is completed from it by --resume.
        if metrics is not None:
            metrics.close()
        summary = end_summary()
        checkpoint(True, final_status, summary)
        kill_at("after_final_checkpoint")
    except BaseException as e:
        bar.close()
        tb.close()
        if metrics is not None:
            metrics.close()
        interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
        try:
            write_status("interrupted" if interrupted else "failed",
                         f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        except OSError:
            pass  # e.g. the disk is full: the error that got us here is the one to report
        raise
    bar.close()
    tb.close()
    if main_rank:
        atomic_write_json(run_dir / "summary.json", summary)
        kill_at("after_summary")
        atomic_write_json(run_dir / "status.json", _status_record(summary))
        if not quiet:
            stab = tracker.summary()
            print(f"memtrans train: {final_status} at step {step}: loss {last_loss if last_loss is None else round(last_loss, 4)}, "
                  f"{tokens} tokens, {summary['tokens_per_s']:.0f} tok/s, {summary['wall_time_s']:.1f}s, "
                  f"{stab['loss_spikes']} loss / {stab['grad_spikes']} grad spikes, "
                  f"{100 * stab['clipped_fraction']:.0f}% clipped"
                  + (f", stopped by {budget_hit}" if budget_hit else "") + f" -> {run_dir}", flush=True)
    return summary


def _logged_loss(metrics_file: Path, step: int) -> float | None:
    """The loss metrics.jsonl logged at `step` (for checkpoints older than their `last_loss` field)."""
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step") == step:
            return rec.get("loss")
    return None


class JsonLines:
    """metrics.jsonl, appended and flushed a line at a time; a failed write names the file."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass  # a failed flush was reported by write()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memtrans train", description="Train a (memorizing) transformer from a YAML config.")
    p.add_argument("--config", help="YAML config (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set model.gate=fixed (repeatable)")
    p.add_argument("--run-dir", help="run directory (default runs/<config hash>)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/latest.pt if present "
                   "(a finished run is never trained again: it returns at once)")
    p.add_argument("--retrain", action="store_true", help="train a finished run whose checkpoint was removed again "
                   "from scratch, same config (its results move to RUN/previous/<time>/)")
    p.add_argument("--init-from", help="run dir or .pt to initialise weights from (new parameters stay fresh)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (errors still shown)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, list(args.overrides))
    if args.init_from:
        cfg.train.init_from = args.init_from
    # the default run directory is named by the resolved config, as the ablation runner names its runs
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / resolve_config(cfg).hash()
    train(cfg, run_dir, resume=args.resume, quiet=args.quiet, retrain=args.retrain)
    return 0


__all__ = ["train", "main", "masked_loss", "autocast_context", "resolve_device", "config_from_dict"]
