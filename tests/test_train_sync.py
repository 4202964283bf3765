"""The training step without host synchronisation (issue 13): values are read on the host only at log steps.

A spy counts, per training step, every read of a tensor's value on the host (`item`, `float`, `int`, `bool`,
`tolist`, `cpu`, ...) while `train()` runs the code a GPU runs (the memory's torch reference path and the
model's device checks, as in test_gpu_ready.py). On a GPU the stream's batch lives on the host before its copy,
so the test marks its `loss_mask` as host data and makes `Batch.to` a real copy (as a device copy would be);
the optimiser's step counters are host tensors on CUDA too (non-capturable AdamW), so reads inside torch.optim
do not count. And the run's metrics and summary are the same whatever `train.log_every` is.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import fields

import pytest
import torch
from torch.overrides import TorchFunctionMode

from memtrans.data import stream as stream_module
from memtrans.memory import ExactMemory
from memtrans.model import MemorizingTransformer
from memtrans.train import train
from memtrans.train.stability import StabilityTracker

from _train_helpers import tiny_config
from test_gpu_ready import HOST_READS, _is_cpu

TIMING = ("time", "tokens_per_s")


class HostTensor(torch.Tensor):
    """A tensor that is host data on any device (the stream's batch before its copy); ops on it stay host data."""


class ReadCounter(TorchFunctionMode):
    """Counts host reads of tensors per training step (step k: from the k-th batch drawn to the next)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.reads: Counter = Counter()
        self.where: dict[int, list[str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        is_read = name in HOST_READS or (name == "to" and any(_is_cpu(a) for a in [*args[1:], kwargs.get("device")]))
        if is_read and self.step and args and isinstance(args[0], torch.Tensor) \
                and not isinstance(args[0], HostTensor) and not _in_torch_optim():
            self.reads[self.step] += 1
            self.where.setdefault(self.step, []).append(f"{name} from {_caller()}")
        return func(*args, **kwargs)


def _in_torch_optim() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if "/torch/optim/" in f.f_code.co_filename.replace("\\", "/"):
            return True
        f = f.f_back
    return False


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and "/torch/" in f.f_code.co_filename.replace("\\", "/"):
        f = f.f_back
    return f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}" if f is not None else "?"


@pytest.fixture
def spied(monkeypatch):
    """The device code path on CPU, a stream whose loss_mask is host data, and a Batch.to that copies."""
    monkeypatch.setattr(ExactMemory, "use_fast", False)
    monkeypatch.setattr(MemorizingTransformer, "host_reads", False)
    spy = ReadCounter()
    draw = stream_module.DocumentStream.__next__

    def next_batch(self):
        b = draw(self)
        spy.step += 1
        b.loss_mask = b.loss_mask.as_subclass(HostTensor)
        return b

    def copy_to(self, device, non_blocking=False):
        return stream_module.Batch(**{f.name: getattr(self, f.name).as_subclass(torch.Tensor).clone()
                                      for f in fields(self)})
    monkeypatch.setattr(stream_module.DocumentStream, "__next__", next_batch)
    monkeypatch.setattr(stream_module.Batch, "to", copy_to)
    return spy


def test_no_host_read_in_steps_between_log_steps(tmp_path, spied):
    cfg = tiny_config(tmp_path, steps=12, train={"log_every": 5, "checkpoint_every": 0})
    with spied:
        s = train(cfg, tmp_path / "run", quiet=True)
    assert s["status"] == "finished" and spied.step == 12
    read_steps = {5, 10, 12}  # log steps and the last
    unexpected = {k: spied.where[k] for k in range(1, 13) if k not in read_steps and spied.reads[k]}
    assert not unexpected, f"host reads in steps that log nothing: {unexpected}"
    assert all(spied.reads[k] > 0 for k in (5, 10))  # the spy sees the reads where they are
    assert sum(spied.reads[k] for k in (5, 10)) <= 2 * 6  # a few reads per log step, not a few per step


def test_a_checkpoint_step_reads_too(tmp_path, spied):
    cfg = tiny_config(tmp_path, steps=8, train={"log_every": 6, "checkpoint_every": 4})
    with spied:
        train(cfg, tmp_path / "run", quiet=True)
    assert {k for k in range(1, 9) if spied.reads[k]} == {4, 6, 8}  # the checkpoint, the log step, the last


def _records(run) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _untimed(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "tokens_per_s")}


# Spikes on a tiny run: a short window and a low factor make loss and gradient-norm spikes (and clipping) common.
SPIKY = {"spike_window": 4, "spike_factor": 1.003, "checkpoint_every": 0}


@pytest.mark.parametrize("every", [5, 7])
def test_metrics_and_summary_do_not_depend_on_log_every(tmp_path, every):
    runs, summaries = {}, {}
    for log_every in (1, every):
        runs[log_every] = tmp_path / f"run{log_every}"
        cfg = tiny_config(tmp_path, steps=16, optim={"grad_clip": 2.0}, train={**SPIKY, "log_every": log_every})
        summaries[log_every] = train(cfg, runs[log_every], quiet=True)
    each, sparse = _records(runs[1]), _records(runs[every])
    assert sorted(sparse) == [s for s in range(1, 17) if s % every == 0 or s == 16]
    for s, rec in sparse.items():
        assert rec == each[s], s
    assert _untimed(summaries[every]) == _untimed(summaries[1])
    assert _untimed(json.loads((runs[every] / "summary.json").read_text())) == _untimed(summaries[1])
    # the spike counts are those of a tracker fed each step's logged values (the old per-step reading)
    ref = StabilityTracker(3, SPIKY["spike_window"], SPIKY["spike_factor"], 4.0, 2.0)
    for s in range(1, 17):
        ref.update(s, each[s]["loss"], each[s]["grad_norm"])
    want = ref.summary()
    got = summaries[every]
    assert want["loss_spikes"] > 0 and want["grad_spikes"] > 0 and 0 < want["clipped_fraction"] < 1  # the test sees some
    for k in ("loss_spikes", "grad_spikes", "loss_spike_steps", "grad_spike_steps", "clipped_fraction",
              "reference_loss"):
        assert got[k] == want[k], k
    assert got["final_loss"] == each[16]["loss"] and got["tokens"] == each[16]["tokens"]


def test_divergence_is_reported_at_its_step_whatever_log_every(tmp_path):
    summaries, runs = {}, {}
    for log_every in (1, 4):
        runs[log_every] = tmp_path / f"run{log_every}"
        cfg = tiny_config(tmp_path, steps=30, optim={"lr": 1e6, "grad_clip": 0.0, "warmup_steps": 0},
                          train={"log_every": log_every, "checkpoint_every": 0})
        summaries[log_every] = train(cfg, runs[log_every], quiet=True)
    a, b = summaries[1], summaries[4]
    d = a["diverged_step"]
    assert a["status"] == b["status"] == "diverged" and b["diverged_step"] == d and d % 4 != 0  # read late
    for k in ("steps", "tokens", "final_loss", "diverged_reason", "loss_spikes", "grad_spikes", "clipped_fraction"):
        assert b[k] == a[k], k
    each, sparse = _records(runs[1]), _records(runs[4])
    assert sorted(sparse) == [s for s in range(4, d, 4)] + [d] and sparse[d]["diverged"]
    for s, rec in sparse.items():
        assert rec == each[s], s
    assert any(f"step {d}" in n and "log_every" in n for n in b["notes"])
    assert not any("log_every" in n for n in a["notes"])


def test_gradient_scaler_overflows_are_skipped_steps_not_a_divergence(tmp_path, monkeypatch):
    """The fp16 path on CPU: a scaler whose first scales overflow fp32 (inf gradients); scaler.step skips those
    steps and lowers the scale, and the run goes on (it used to end `diverged` at step 1)."""
    from memtrans.train import trainer
    monkeypatch.setattr(trainer, "grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    cfg = tiny_config(tmp_path, steps=12, train={"log_every": 4, "checkpoint_every": 0})
    s = train(cfg, tmp_path / "run", quiet=True)
    assert s["status"] == "finished" and not s["diverged"] and s["steps"] == 12
    assert 1 <= s["overflow_steps"] < 12
    rows = _records(tmp_path / "run")
    assert rows[12]["loss"] < rows[4]["loss"]  # trained once the scale fits


@pytest.mark.slow
def test_two_processes_read_and_all_reduce_at_the_log_steps_only(tmp_path):
    """Under torchrun (2 CPU processes, gloo) the losses and token counts are all-reduced at the reads: the
    metrics and summary are those of the run that reads every step."""
    import yaml
    from test_distributed import ok, torchrun, untimed

    runs = {}
    for log_every in (1, 3):
        d = tiny_config(tmp_path, steps=8, train={"log_every": log_every, "checkpoint_every": 0}).to_dict()
        (tmp_path / f"c{log_every}.yaml").write_text(yaml.safe_dump(d))
        runs[log_every] = tmp_path / f"run{log_every}"
        ok(torchrun(tmp_path / f"c{log_every}.yaml", runs[log_every]))
    each, sparse = _records(runs[1]), _records(runs[3])
    assert sorted(sparse) == [3, 6, 8] and all(sparse[s] == each[s] for s in sparse)
    a, b = (untimed(json.loads((runs[k] / "summary.json").read_text())) for k in (1, 3))
    assert a["world_size"] == 2 and a == b  # rank_param_checksums included: the same weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_training_steps_between_reads_never_synchronise(tmp_path, monkeypatch):
    """On a GPU, torch reports every synchronising CUDA call (blocking copies, item, nonzero, ...): none in the
    steps after the first (allocations, caches) that are not read steps."""
    import warnings
    draw, seen = stream_module.DocumentStream.__next__, {}

    def next_batch(self):
        b = draw(self)
        seen[self.batches] = sum("synchroniz" in str(w.message) for w in caught)  # syncs before step `batches`
        return b
    monkeypatch.setattr(stream_module.DocumentStream, "__next__", next_batch)
    cfg = tiny_config(tmp_path, steps=12, train={"device": "cuda", "log_every": 5, "checkpoint_every": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, tmp_path / "run", quiet=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = {k: seen[k + 1] - seen[k] for k in range(2, 12) if k not in (5, 10)}
    assert not any(syncs.values()), (syncs, [str(w.message) for w in caught if "synchroniz" in str(w.message)][:5])
