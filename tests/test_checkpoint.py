import json

import pytest
import torch

from memtrans.train import train
from memtrans.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

from _train_helpers import tiny_config


def losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in
            map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


class Crash(Exception):
    pass


@pytest.mark.parametrize("memory", [True, False])
def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, memory):
    N, K = 14, 5
    full = tmp_path / "full"
    train(tiny_config(tmp_path, memory, steps=N), full, quiet=True)

    part = tmp_path / "part"

    def crash(step):  # killed two steps after the checkpoint at K: those metrics lines must be dropped
        if step == K + 2:
            raise Crash()
    with pytest.raises(Crash):
        train(tiny_config(tmp_path, memory, steps=N), part, quiet=True, on_step=crash)
    assert json.loads((part / "status.json").read_text())["status"] == "failed"
    ck = load_checkpoint(part / "checkpoints" / "latest.pt")
    assert ck["step"] == K
    for key in ("model", "optimizer", "scheduler", "rng", "stream", "model_state", "stability", "tokens", "config"):
        assert key in ck
    assert [s for s, *_ in losses(part)] == list(range(1, K + 3))
    train(tiny_config(tmp_path, memory, steps=N), part, resume=True, quiet=True)
    assert losses(part) == losses(full)  # identical floats, steps 1..N, no duplicates
    a = load_checkpoint(full / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(part / "checkpoints" / "latest.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failing_save_leaves_old_checkpoint_intact(tmp_path):
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("save failed half-way")
    with pytest.raises(RuntimeError):
        save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temp files left behind


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="no checkpoint"):
        resolve_checkpoint(tmp_path)


def test_resume_with_changed_config_is_refused(tmp_path):
    run = tmp_path / "run"

    def crash(step):
        if step == 6:
            raise Crash()
    with pytest.raises(Crash):
        train(tiny_config(tmp_path, steps=10), run, quiet=True, on_step=crash)
    with pytest.raises(ValueError, match="model.dim"):
        train(tiny_config(tmp_path, steps=10, model={"dim": 64, "head_dim": 32}), run, resume=True, quiet=True)
    # a longer run is allowed
    s = train(tiny_config(tmp_path, steps=12), run, resume=True, quiet=True)
    assert s["steps"] == 12


def test_rank_files_missing_or_foreign_are_refused_naming_the_file(tmp_path):
    """A checkpoint of W processes names W rank files; a missing one, or one of another rank or step, is a
    ValueError naming it (never a silent start from empty memories)."""
    from memtrans.train.checkpoint import load_rank_state, rank_file_name, remove_rank_files, save_checkpoint

    ckpt_file = tmp_path / "checkpoints" / "latest.pt"
    ckpt = {"step": 6, "world_size": 2, "rank_files": [rank_file_name(r, 6) for r in (0, 1)]}
    mine = {"rng": {}, "stream": {"rank": 0}, "model_state": {}}
    save_checkpoint({"step": 6, "rank": 0, "world_size": 2, **mine}, ckpt_file.parent / "rank0-step6.pt")
    assert load_rank_state(ckpt, ckpt_file, 0, 2)["stream"] == {"rank": 0}
    with pytest.raises(ValueError, match=r"rank1-step6.pt is missing.*2 processes.*checkpoints/ directory"):
        load_rank_state(ckpt, ckpt_file, 1, 2)
    save_checkpoint({"step": 3, "rank": 1, "world_size": 2, **mine}, ckpt_file.parent / "rank1-step6.pt")
    with pytest.raises(ValueError, match=r"rank1-step6.pt does not belong.*at step 3, expected rank 1 of 2 at step 6"):
        load_rank_state(ckpt, ckpt_file, 1, 2)
    with pytest.raises(ValueError, match="names 2 rank files for 3 processes"):
        load_rank_state(ckpt, ckpt_file, 0, 3)
    # one process: its state lives in latest.pt itself
    assert load_rank_state({"ranks": [mine]}, ckpt_file, 0, 1) is mine
    save_checkpoint({}, ckpt_file.parent / "rank0-step3.pt")
    remove_rank_files(ckpt_file.parent, 0, keep="rank0-step6.pt")
    assert sorted(p.name for p in ckpt_file.parent.iterdir()) == ["rank0-step6.pt", "rank1-step6.pt"]
