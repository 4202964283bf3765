"""Two CPU processes under torchrun (gloo): parameters stay bit-identical across ranks, each rank saves and
restores its own memories in its own checkpoint file, and a run interrupted at any moment (killed between the
rank files and the shared checkpoint, or in the middle of training) resumes to exactly the uninterrupted run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _train_helpers import tiny_dict
from memtrans.config import config_from_dict
from memtrans.train import train

TIMING = ("wall_time_s", "tokens_per_s", "time")  # the only fields two identical runs may differ in


def torchrun(cfg_file: Path, run: Path, kill_at: str | None = None, resume: bool = False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEMTRANS_TEST_KILL_AT", None)
    if kill_at:
        env["MEMTRANS_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "memtrans", "train", "--config", str(cfg_file), "--run-dir", str(run), "--quiet"]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=180)


def ok(p) -> None:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def untimed(obj):
    """`obj` without timing fields, tensors as they are (compared with `same`)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, (list, tuple)):
        return [untimed(v) for v in obj]
    return obj


def same(a, b, path="") -> None:
    """a == b exactly: tensors bit for bit (dtype and shape included), containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__array__") and not isinstance(a, (int, float, str, bool)):
        assert (a == b).all(), path  # numpy arrays (RNG state)
    else:
        assert a == b, (path, a, b)


def metrics(run: Path) -> list[dict]:
    return [untimed(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_reference(run: Path) -> None:
    """The uninterrupted 2-process run: identical parameters; each rank saved its own memories, in its own file."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["steps"] == 8
    sums = summary["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    ck = load(run / "checkpoints" / "latest.pt")
    assert ck["world_size"] == 2 and ck["step"] == 8
    # no rank's memories in the shared file: each rank wrote its own and removed its older (step 3, 6) files
    assert "ranks" not in ck and "model_state" not in ck
    assert ck["rank_files"] == ["rank0-step8.pt", "rank1-step8.pt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt", "rank0-step8.pt", "rank1-step8.pt"]
    mine = [load(run / "checkpoints" / f"rank{r}-step8.pt") for r in (0, 1)]
    # each rank read its own documents (index % 2 == rank) in its own slots, and filled its own memories
    assert [m["stream"]["rank"] for m in mine] == [0, 1] and [m["rank"] for m in mine] == [0, 1]
    mem = [m["model_state"]["memories"][1] for m in mine]
    assert mem[0].keys() == mem[1].keys()
    assert any(isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.equal(v, mem[1][k])
               for k, v in mem[0].items()), "both ranks saved the same memories"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # rank 0 alone writes: no duplicate lines
    # tokens count both ranks: 2 ranks x 2 slots x 16 positions per step at most
    assert rows[0]["tokens"] <= 64 and rows[-1]["tokens"] > 2 * 32


def test_two_process_run_interrupted_twice_resumes_bit_identical(tmp_path):
    """Killed after every rank wrote its step-6 file but before latest.pt named them (resumes from step 3),
    then killed in the middle of step 7's aftermath (resumes from 6): the end is the uninterrupted run's, bit
    for bit: weights, optimiser, each rank's memories, caches, stream and RNG, metrics and summary."""
    cfg = tiny_dict(tmp_path, memory=True, steps=8)
    cfg["train"]["checkpoint_every"] = 3
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    ref, run = tmp_path / "reference", tmp_path / "run"
    ok(torchrun(cfg_file, ref))
    check_reference(ref)

    p = torchrun(cfg_file, run, kill_at="rank_files_written_6")
    assert p.returncode != 0
    ck = run / "checkpoints"
    assert load(ck / "latest.pt")["step"] == 3
    assert {"rank0-step3.pt", "rank1-step3.pt", "rank0-step6.pt", "rank1-step6.pt"} <= {f.name for f in ck.iterdir()}

    p = torchrun(cfg_file, run, kill_at="after_step_7", resume=True)
    assert p.returncode != 0
    assert load(ck / "latest.pt")["step"] == 6
    assert sorted(f.name for f in ck.iterdir()) == ["latest.pt", "rank0-step6.pt", "rank1-step6.pt"]

    # one process cannot take over the memories of two
    with pytest.raises(ValueError, match=r"written by 2 process.*torchrun --nproc_per_node=2"):
        train(config_from_dict(cfg), run, resume=True, quiet=True)

    ok(torchrun(cfg_file, run, resume=True))
    a, b = load(ref / "checkpoints" / "latest.pt"), load(run / "checkpoints" / "latest.pt")
    assert a["step"] == b["step"] == 8 and a["finished"] and b["finished"]
    for key in ("model", "optimizer", "scheduler", "stability", "tokens", "last_loss", "rank_files"):
        same(a[key], b[key], key)
    same(untimed(a["summary"]), untimed(b["summary"]), "summary")
    for r in (0, 1):
        same(untimed(load(ref / "checkpoints" / f"rank{r}-step8.pt")),
             untimed(load(run / "checkpoints" / f"rank{r}-step8.pt")), f"rank{r}")
    assert metrics(run) == metrics(ref)
    assert untimed(json.loads((run / "summary.json").read_text())) == untimed(json.loads((ref / "summary.json").read_text()))
