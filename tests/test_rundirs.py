"""Run directories that defend themselves (issue 14): a finished run is never retrained or changed, a kill at
the end of a run is completed by --resume, `ablate` locks its output directory and stops its children on
SIGTERM, and every failure a user can meet ends in one line, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from memtrans.ablation import runner
from memtrans.cli import main as cli_main
from memtrans.train import train
from memtrans.train.checkpoint import load_checkpoint
from memtrans.utils import DirLock, LockedError, describe_os_error

from _train_helpers import tiny_config, tiny_dict
from test_runner import FakeRun

ROOT = Path(__file__).resolve().parents[1]
PLAN = str(ROOT / "plans" / "memorizing_transformers.yaml")
TIMING = ("wall_time_s", "tokens_per_s")  # the only summary fields two identical runs may differ in
METRIC_TIMING = ("time", "tokens_per_s")  # and the only metrics.jsonl fields


def untimed_metrics(data: bytes) -> list[dict]:
    """metrics.jsonl records without their timing fields (two identical trainings agree on the rest)."""
    return [{k: v for k, v in json.loads(line).items() if k not in METRIC_TIMING}
            for line in data.decode().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file under `run` (path -> bytes), to prove that nothing was changed."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def read(path: Path):
    return json.loads(path.read_text())


def write_config(tmp_path: Path, d: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


def cli(*args, env=None, prefix=(), timeout=300, cwd=None):
    """`python -m memtrans ARGS` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run([*prefix, sys.executable, "-m", "memtrans", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """The process said what went wrong in one line (its last), without a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert ": error: " in last, stderr
    for n in needles:
        assert n in last, (n, stderr)
    return last


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished tiny run (6 steps, checkpoint at 5 and at the end) with a fake eval.json; tests copy it."""
    base = tmp_path_factory.mktemp("finished")
    run = base / "run"
    train(tiny_config(base, steps=6), run, quiet=True)
    (run / "eval.json").write_text(json.dumps({"split": "test", "loss": 1.0}))
    return base, run


def copy_run(finished_run, tmp_path) -> tuple[dict, Path]:
    base, run = finished_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return tiny_dict(base, steps=6), dst


def interrupted_run(tmp_path, steps=12, crash_at=7) -> tuple[dict, Path]:
    """A run killed (an exception) at step `crash_at`, its checkpoint at 5."""
    run = tmp_path / "run"

    def crash(step):
        if step == crash_at:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, steps=steps), run, quiet=True, on_step=crash)
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 5
    return tiny_dict(tmp_path, steps=steps), run


# ------------------------------------------------------------------------------ finished-run guards

def test_finished_run_without_checkpoint_is_refused_unless_retrain(finished_run, tmp_path, capsys):
    d, run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")  # how published results are stored
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"checkpoint .* is gone.*--retrain"):
        train(_cfg(d), run, resume=True, quiet=True)
    assert snapshot(run) == before
    cfg_file = write_config(tmp_path, d)
    assert cli_main(["train", "--config", str(cfg_file), "--run-dir", str(run), "--resume"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--retrain", str(run))
    assert snapshot(run) == before  # nothing written, eval.json kept beside the training it describes

    # --retrain: the old results move aside whole, the run is trained again (deterministic: same metrics)
    assert cli_main(["train", "--config", str(cfg_file), "--run-dir", str(run), "--resume", "--retrain",
                     "--quiet"]) == 0
    (prev,) = (run / "previous").iterdir()
    for name in ("metrics.jsonl", "summary.json", "status.json", "eval.json"):
        assert (prev / name).read_bytes() == before[name], name
    assert not (run / "eval.json").exists()  # the new training has not been evaluated
    # a new training (the old metrics.jsonl is in previous/, byte for byte): the same losses, other timings
    assert untimed_metrics((run / "metrics.jsonl").read_bytes()) == untimed_metrics(before["metrics.jsonl"])
    assert read(run / "status.json")["status"] == "finished" and (run / "checkpoints" / "latest.pt").is_file()


def _cfg(d):
    from memtrans.config import config_from_dict
    return config_from_dict(d)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_finished_run_refuses_another_config_naming_the_fields(finished_run, tmp_path, checkpoint):
    d, run = copy_run(finished_run, tmp_path)
    if not checkpoint:
        shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    other = json.loads(json.dumps(d))
    other["model"]["gate"] = "fixed"
    other["train"]["steps"] = 9
    with pytest.raises(ValueError) as e:
        train(_cfg(other), run, resume=True, quiet=True, retrain=True)
    msg = str(e.value)
    assert "model.gate: 'learned_scalar' -> 'fixed'" in msg and "train.steps: 6 -> 9" in msg, msg
    assert "nothing was changed" in msg
    assert snapshot(run) == before
    # hardware and eval settings are not another run
    same = json.loads(json.dumps(d))
    same["train"]["threads"] = 2
    same["eval"]["batch_size"] = 1
    if checkpoint:
        assert train(_cfg(same), run, resume=True, quiet=True)["final_loss"] == read(run / "summary.json")["final_loss"]
        assert snapshot(run) == before


def test_finished_run_with_status_overwritten_is_restored_not_retrained(finished_run, tmp_path):
    d, run = copy_run(finished_run, tmp_path)
    status = read(run / "status.json")
    metrics = (run / "metrics.jsonl").read_bytes()
    # what the ablation runner records when the evaluation of a finished run failed
    (run / "status.json").write_text(json.dumps({**status, "status": "failed", "error": "exit code 2 from eval"}))
    s = train(_cfg(d), run, resume=True, quiet=True)
    assert s == read(run / "summary.json") and read(run / "status.json") == status
    assert (run / "metrics.jsonl").read_bytes() == metrics


# --------------------------------------------------------------------------- the end of a run

@pytest.mark.parametrize("point", ["after_final_checkpoint", "after_summary"])
def test_kill_between_final_checkpoint_and_summary_resumes_to_the_same_summary(tmp_path, point):
    d = tiny_dict(tmp_path, steps=7)
    reference = train(_cfg(d), tmp_path / "reference", quiet=True)
    run = tmp_path / "run"
    cfg_file = write_config(tmp_path, d)
    r = cli("train", "--config", cfg_file, "--run-dir", run, "--quiet", env={"MEMTRANS_TEST_KILL_AT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["finished"] and ckpt["step"] == 7
    assert read(run / "status.json")["status"] == "running"
    assert (run / "summary.json").exists() == (point == "after_summary")
    metrics = (run / "metrics.jsonl").read_bytes()

    s = train(_cfg(d), run, resume=True, quiet=True)
    assert s == read(run / "summary.json") == ckpt["summary"]  # exactly what the killed run would have written
    assert s["final_loss"] is not None and s["final_loss"] == reference["final_loss"]
    assert {k: v for k, v in s.items() if k not in TIMING} == {k: v for k, v in reference.items() if k not in TIMING}
    st = read(run / "status.json")
    assert st["status"] == "finished" and st["step"] == 7 and st["error"] is None
    assert (run / "metrics.jsonl").read_bytes() == metrics  # not trained again


def test_resume_to_the_checkpoint_step_keeps_the_last_loss(tmp_path):
    """An interrupted run resumed with train.steps lowered to its checkpoint's step runs no step: its final loss
    is the checkpoint's, not null (the old bug: last_loss was set only inside the step loop)."""
    d, run = interrupted_run(tmp_path)
    d["train"]["steps"] = 5
    s = train(_cfg(d), run, resume=True, quiet=True)
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] == 5]
    assert s["steps"] == 5 and s["final_loss"] == logged[0]["loss"] is not None


def test_stale_tmp_files_of_interrupted_writes_are_removed_on_the_next_start(tmp_path):
    d, run = interrupted_run(tmp_path)
    ck = run / "checkpoints"
    stale = [ck / ".latest.pt.k1l2.tmp", run / ".status.json.ab12.tmp", run / ".metrics.jsonl.x.tmp"]
    old_foreign, fresh_foreign = run / ".eval.json.old.tmp", run / ".eval.json.new.tmp"
    for p in stale + [old_foreign, fresh_foreign]:
        p.write_bytes(b"half a file")
    os.utime(old_foreign, (time.time() - 7200,) * 2)
    s = train(_cfg(d), run, resume=True, quiet=True)
    assert s["status"] == "finished"
    assert not any(p.exists() for p in stale + [old_foreign])
    assert fresh_foreign.exists()  # maybe an evaluation still writing: left alone
    assert not (run / ".lock").exists()  # released


def test_interrupted_status_on_keyboard_interrupt(tmp_path):
    d, run = interrupted_run(tmp_path)
    st = read(run / "status.json")
    assert st["status"] == "interrupted" and "KeyboardInterrupt" in st["error"]
    assert train(_cfg(d), run, resume=True, quiet=True)["steps"] == 12


# ------------------------------------------------------------------------------------------ locks

def test_run_dir_lock_refuses_a_second_trainer_and_a_dead_holders_lock_is_taken_over(tmp_path):
    d, run = interrupted_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from memtrans.utils import DirLock; "
                               f"DirLock({str(run)!r}, '.lock').acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"PID {holder.pid}"):
            train(_cfg(d), run, resume=True, quiet=True)
        assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 5
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists()  # left behind by the killed holder: stale
    assert train(_cfg(d), run, resume=True, quiet=True)["steps"] == 12


def test_stale_ablate_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", "import os, signal; from memtrans.utils import DirLock; "
                             f"DirLock({str(out)!r}, '.ablate.lock').acquire(); os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == -signal.SIGKILL and (out / ".ablate.lock").exists()
    (out / ".plan.json.zz.tmp").write_text("{")  # an interrupted write of the plan record
    fake = FakeRun()
    assert runner.main([PLAN, "--preset", "ci", "--out", str(out), "--no-progress", "--only", "Memory Ablation"],
                       run_fn=fake) == 0
    assert len(fake.calls) == 2
    err = capsys.readouterr().err
    assert "took over the lock of PID" in err
    assert not (out / ".ablate.lock").exists() and not (out / ".plan.json.zz.tmp").exists()


def test_second_ablate_is_refused_and_sigterm_stops_every_child(tmp_path):
    """Two real `memtrans ablate` processes on one --out; then SIGTERM to the first: it stops its `memtrans
    train` child, waits for it, records the run as interrupted and exits 143; no process is left."""
    out = tmp_path / "out"
    env = {"MEMTRANS_CACHE": str(tmp_path / "cache")}
    cmd = ["ablate", PLAN, "--preset", "ci", "--out", out, "--only", "Memory Ablation", "--no-progress",
           "--no-report", "--set", "train.steps=100000"]
    first = subprocess.Popen([sys.executable, "-m", "memtrans", *map(str, cmd)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        deadline = time.time() + 240
        while not list(out.glob("runs/*/metrics.jsonl")):  # a child is training (past its start-up)
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "no run started"
            time.sleep(0.5)
        children = processes_naming(out, exclude=first.pid)
        assert children, "no child process found"

        second = cli(*cmd, env=env, timeout=120)
        assert second.returncode == 2
        assert_one_line_error(second.stderr, f"PID {first.pid}", "in use", str(out))

        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        time.sleep(0.5)
        leftovers = processes_naming(out)
        for pid in leftovers:  # a failing test leaves no training behind on the machine (they name our tmp dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert not leftovers, "a child survived"
    assert "Traceback" not in stderr and "interrupted" in stderr.splitlines()[-1]
    assert not [p for p in children if alive(p)], "a child survived"
    (run,) = [p.parent for p in out.glob("runs/*/metrics.jsonl")]
    st = read(run / "status.json")
    assert st["status"] == "interrupted", st
    child_err = (run / "stderr.log").read_text()  # the trainer itself stopped cleanly on the forwarded SIGTERM
    assert "Traceback" not in child_err and "interrupted by SIGTERM" in child_err, child_err
    assert "interrupted" in read(out / "plan.json")["statuses"].values()
    assert not (out / ".ablate.lock").exists()


def processes_naming(path: Path, exclude: int | None = None) -> list[int]:
    """PIDs of live processes whose command line names `path`."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in (os.getpid(), exclude):
            continue
        try:
            if str(path) in (p / "cmdline").read_bytes().decode(errors="replace") and alive(int(p.name)):
                found.append(int(p.name))
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_missing_kernel_is_noted_once_per_ablation_and_by_no_command(tmp_path, monkeypatch, capsys):
    """Without the fused top-k kernel, `ablate` says so once (not once per run), `info` says why, and a command
    (`train` here, as every run of an ablation starts it) prints nothing about it."""
    from memtrans.memory import fast_topk

    monkeypatch.setattr(fast_topk, "unavailable_reason", lambda: "no C++ compiler")
    fake = FakeRun()
    assert runner.main([PLAN, "--preset", "ci", "--out", str(tmp_path / "out"), "--no-progress", "--no-report",
                        "--only", "Memory Ablation"], run_fn=fake) == 0
    assert len(fake.calls) == 2
    out = capsys.readouterr()
    assert (out.out + out.err).count("fused top-k kernel is unavailable (no C++ compiler)") == 1, out

    env = {"MEMTRANS_CPU_ISA": "reference"}  # the kernel off, as on a machine that cannot build it
    r = cli("info", env=env, timeout=120)
    assert r.returncode == 0 and "MEMTRANS_CPU_ISA=reference" in r.stdout, r.stdout + r.stderr
    d = tiny_dict(tmp_path, steps=2)
    r = cli("train", "--config", write_config(tmp_path, d), "--run-dir", tmp_path / "run", env=env)
    assert r.returncode == 0, r.stderr
    said = (r.stdout + r.stderr).replace(str(tmp_path), "TMP").lower()
    assert "kernel" not in said and "top-k" not in said and "reference path" not in said, said
    # the children of `ablate` would filter the old per-command warning, should one come back
    code = ("import warnings; warnings.warn('memtrans fused top-k kernel unavailable, using the torch reference "
            "path (no compiler)'); warnings.warn('another warning')")
    outcome = runner.run_subprocess(tmp_path, [[sys.executable, "-c", code]])
    assert outcome.returncode == 0
    err = (tmp_path / "stderr.log").read_text()
    assert "another warning" in err and "fused top-k" not in err


# ---------------------------------------------------------------------- one line, never a traceback

def test_cli_error_paths_print_one_line_and_no_traceback(finished_run, tmp_path, capsys):
    """Every error path a user can reach: one line naming the file or field, exit 2. A new path that raises
    anything else fails here (the exception escapes cli.main)."""
    d, run = copy_run(finished_run, tmp_path)
    cfg_file = write_config(tmp_path, d)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gone = tmp_path / "gone"
    shutil.copytree(run, gone)
    shutil.rmtree(gone / "checkpoints")
    cases = [
        (["train", "--config", tmp_path / "missing.yaml"], "missing.yaml"),
        (["train", "--config", cfg_file, "--set", "train.steps=-5", "--run-dir", tmp_path / "r1"], "train.steps"),
        (["train", "--config", cfg_file, "--set", "train.steps=0", "--run-dir", tmp_path / "r1"], "train.steps"),
        (["train", "--config", cfg_file, "--set", "optim.lr=0", "--run-dir", tmp_path / "r1"], "optim.lr"),
        (["train", "--config", cfg_file, "--set", "train.budget_tokens=-1", "--run-dir", tmp_path / "r1"],
         "train.budget_tokens"),
        (["train", "--config", cfg_file, "--run-dir", a_file / "run"], str(a_file)),
        (["train", "--config", cfg_file, "--run-dir", run], "--run-dir"),
        (["train", "--config", cfg_file, "--run-dir", run, "--resume", "--set", "model.gate=fixed"], "model.gate"),
        (["train", "--config", cfg_file, "--run-dir", gone, "--resume"], "--retrain"),
        (["eval", tmp_path / "nowhere"], "nowhere"),
        (["eval", gone], "checkpoint"),
        (["eval", run, "--split", "nope"], "nope"),
        (["ablate", tmp_path / "noplan.yaml", "--preset", "ci"], "noplan.yaml"),
        (["ablate", PLAN, "--preset", "ci", "--out", a_file / "out", "--no-progress"], str(a_file)),
        (["ablate", PLAN, "--preset", "ci", "--out", tmp_path / "o", "--set", "train.steps=-5"], "train.steps"),
        (["report", tmp_path / "nowhere"], "nowhere"),
    ]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("key 3 = 7 .")
    cases += [
        (["generate", run, "--prompt-file", tmp_path / "no_prompt.txt"], "no_prompt.txt"),
        (["generate", tmp_path / "nowhere", "--prompt-file", prompt], "nowhere"),
        (["generate", gone, "--prompt-file", prompt], "checkpoint"),
        (["generate", run, "--prompt-file", prompt, "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["generate", run, "--prompt-file", prompt, "--top-p", "2"], "top_p"),
        (["info", "--config", tmp_path / "missing.yaml"], "missing.yaml"),
        (["info", "--set", "nope=1"], "nope"),
        (["report", run], "plan.json"),
        (["fetch-corpus", "nope"], "nope"),  # argparse's own error: one line, exit 2
    ]
    from memtrans.cli import COMMANDS
    assert set(COMMANDS) <= {argv[0] for argv, _ in cases}, "a command without an error case here"
    for argv, needle in cases:
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert_one_line_error(err, needle)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "o" / "runs").exists()


def test_cli_turns_every_error_a_user_meets_into_one_line(monkeypatch, capsys):
    """cli.main's side of it: whatever a command raises of these, one line and the exit code; a bug (any
    other exception) still shows its traceback."""
    import types

    from memtrans import cli
    from memtrans.utils import Interrupted

    errors = [(ValueError("model.dim: must be positive"), 2, "model.dim"),
              (OSError(errno.ENOSPC, "No space left on device", "/r/x.pt"), 2, "no space left"),
              (OSError(errno.EFBIG, "File too large", "/r/x.pt"), 2, "ulimit -f"),
              (PermissionError(errno.EACCES, "Permission denied", "/r"), 2, "permission denied: /r"),
              (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/c.yaml"), 2, "/r/c.yaml"),
              (Interrupted(signal.SIGTERM), 128 + signal.SIGTERM, "interrupted by SIGTERM"),
              (KeyboardInterrupt(), 128 + signal.SIGINT, "interrupted by SIGINT")]
    fake = types.ModuleType("memtrans_fake_command")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", (fake.__name__, "raises what it is told"))
    for error, code, needle in errors:
        def main(argv, error=error):
            raise error
        fake.main = main
        assert cli.main(["fake"]) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err
    fake.main = lambda argv: [][1]
    with pytest.raises(IndexError):
        cli.main(["fake"])


def test_model_api_refuses_token_ids_outside_the_vocabulary():
    from memtrans import MemorizingTransformer, ModelConfig

    model = MemorizingTransformer(ModelConfig(vocab_size=16, dim=32, depth=2, heads=2, head_dim=16, segment_len=8,
                                              memory_layers=(1,), memory_size=32, knn_k=4))
    state = model.init_state(2)
    model(torch.randint(0, 16, (2, 8)), state)
    for bad in (16, -1):
        tokens = torch.randint(0, 16, (2, 8))
        tokens[1, 3] = bad
        with pytest.raises(ValueError, match=rf"model.vocab_size=16\), got {bad}"):
            model(tokens, state)
        with pytest.raises(ValueError, match="model.vocab_size"):
            model.extend(tokens[:, :4], model.init_state(2))  # the bad id is at column 3
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 8), state)


def test_os_errors_are_described_with_the_file_and_the_fix():
    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/r/checkpoints/latest.pt"))
    assert "no space left" in full and "/r/checkpoints/latest.pt" in full and "nothing finished was lost" in full
    big = describe_os_error(OSError(errno.EFBIG, "File too large", "/r/eval.json"))
    assert "file too large" in big and "ulimit -f" in big and "/r/eval.json" in big
    assert "permission denied: /r" in describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/r"))
    assert "read-only file system" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/r"))


# ------------------------------------------------------------------------------ disk full, read-only

def checkpoint_bytes(run: Path) -> int:
    return (run / "checkpoints" / "latest.pt").stat().st_size


def test_file_size_limit_while_checkpointing_and_writing_eval_json(tmp_path):
    """`ulimit -f` makes writes fail with EFBIG, as a full disk fails with ENOSPC: one line, exit 2, the old
    checkpoint and eval.json intact, no temporary files left; the same command then completes."""
    d, run = interrupted_run(tmp_path, steps=12)
    cfg_file = write_config(tmp_path, d)
    old = load_checkpoint(run / "checkpoints" / "latest.pt")
    kb = checkpoint_bytes(run) // 1024 // 2  # config, status and metrics fit; a checkpoint does not
    limited = ("bash", "-c", f'ulimit -f {kb}; exec "$@"', "bash")
    r = cli("train", "--config", cfg_file, "--run-dir", run, "--resume", "--quiet", prefix=limited)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "file too large", str(run / "checkpoints" / "latest.pt"))
    kept = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert kept["step"] == old["step"] == 5 and all(torch.equal(kept["model"][k], old["model"][k]) for k in old["model"])
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["latest.pt"]
    assert read(run / "status.json")["status"] == "failed" and "File too large" in read(run / "status.json")["error"]

    r = cli("train", "--config", cfg_file, "--run-dir", run, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    assert read(run / "summary.json")["steps"] == 12
    (run / "eval.json").write_text(json.dumps({"split": "test", "loss": 9.0, "note": "an earlier result"}))
    before = (run / "eval.json").read_bytes()
    r = cli("eval", run, "--no-plots", prefix=("bash", "-c", 'ulimit -f 1; exec "$@"', "bash"))
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "file too large", str(run / "eval.json"))
    assert (run / "eval.json").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written (a disk filling up)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_checkpointing(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a checkpoint write (through torch.save, which wraps it in a RuntimeError): one
    line naming the file, exit 2, the previous checkpoint intact, no temporary file, status `failed`."""
    import memtrans.utils as U

    d, run = interrupted_run(tmp_path, steps=12)
    old = (run / "checkpoints" / "latest.pt").read_bytes()
    real = U.atomic_write

    def filling_up(path, write, mode="w"):
        if mode == "wb":
            return real(path, lambda f: write(FullDisk(f, room=4096)), mode)
        return real(path, write, mode)
    monkeypatch.setattr(U, "atomic_write", filling_up)
    cfg_file = write_config(tmp_path, d)
    assert cli_main(["train", "--config", str(cfg_file), "--run-dir", str(run), "--resume", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "no space left", str(run / "checkpoints" / "latest.pt"),
                          "run the same command again")
    assert (run / "checkpoints" / "latest.pt").read_bytes() == old
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["latest.pt"]
    st = read(run / "status.json")
    assert st["status"] == "failed" and "No space left" in st["error"], st
    monkeypatch.setattr(U, "atomic_write", real)  # space freed: the same command completes
    assert cli_main(["train", "--config", str(cfg_file), "--run-dir", str(run), "--resume", "--quiet"]) == 0
    assert read(run / "summary.json")["steps"] == 12


def _readonly_prefix(tmp_path: Path) -> tuple[str, ...]:
    """A command prefix under which a directory without write permission cannot be written: nothing for a
    normal user; for root (who writes anywhere), setpriv dropping the capabilities that bypass permissions."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--")
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True)
    except FileNotFoundError:
        pytest.skip("running as root without setpriv: cannot make a directory read-only")
    finally:
        probe.chmod(0o755)
    if r.returncode == 0:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here")
    return prefix


def make_readonly(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)


def make_writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)


def test_read_only_run_and_output_directories(finished_run, tmp_path):
    prefix = _readonly_prefix(tmp_path)
    d, run = copy_run(finished_run, tmp_path)
    cfg_file = write_config(tmp_path, d)
    d2, interrupted = interrupted_run(tmp_path / "i", steps=12)
    cfg2 = write_config(tmp_path, d2, "c2.yaml")
    out = tmp_path / "out"
    out.mkdir()
    for p in (run, interrupted, out):
        make_readonly(p)
    before = {p: snapshot(p) for p in (run, interrupted)}
    try:
        # a finished run needs no writes: --resume answers at once
        r = cli("train", "--config", cfg_file, "--run-dir", run, "--resume", prefix=prefix)
        assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
        r = cli("train", "--config", cfg2, "--run-dir", interrupted, "--resume", prefix=prefix)
        assert r.returncode == 2
        assert_one_line_error(r.stderr, "permission denied", str(interrupted))
        r = cli("eval", run, "--no-plots", prefix=prefix)
        assert r.returncode == 2
        assert_one_line_error(r.stderr, "permission denied", str(run))
        r = cli("ablate", PLAN, "--preset", "ci", "--out", out, "--no-progress", prefix=prefix)
        assert r.returncode == 2
        assert_one_line_error(r.stderr, "permission denied", str(out))
    finally:
        for p in (run, interrupted, out):
            make_writable(p)
    assert {p: snapshot(p) for p in (run, interrupted)} == before
