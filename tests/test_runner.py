"""Runner: dry run, skipping finished runs, resuming, failures, the subprocess contract (fake executor)."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from memtrans.ablation import runner
from memtrans.ablation.runner import RunOutcome, run_commands

ROOT = Path(__file__).resolve().parents[1]
PLAN = str(ROOT / "plans" / "memorizing_transformers.yaml")


class FakeRun:
    """Stands in for train + eval: writes the run files a finished run has; can fail chosen runs."""

    def __init__(self, fail_if=None):
        self.calls: list[Path] = []
        self.commands: list[list[list[str]]] = []
        self.fail_if = fail_if

    def __call__(self, run_dir, commands):
        run_dir = Path(run_dir)
        self.calls.append(run_dir)
        self.commands.append(commands)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        if self.fail_if and self.fail_if(cfg):
            (run_dir / "status.json").write_text(json.dumps({"status": "running", "step": 3}))
            return RunOutcome(3, "Traceback ...\nRuntimeError: boom\n", "python -m memtrans train ...")
        steps = cfg["train"]["steps"]
        loss = 3.0 if cfg["model"]["memory_layers"] else 3.5
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": loss + 1.0 / (s + 1), "grad_norm": 1.0, "tokens_per_s": 100.0}) + "\n"
            for s in range(0, steps + 1, 10)))
        (run_dir / "summary.json").write_text(json.dumps({"final_loss": loss, "loss_spikes": 0, "grad_spikes": 0,
                                                          "clipped_fraction": 0.0, "diverged": False,
                                                          "tokens_per_s": 100.0}))
        (run_dir / "status.json").write_text(json.dumps({"status": "finished", "step": steps, "error": None}))
        (run_dir / "eval.json").write_text(json.dumps({"split": "test", "loss": loss, "ppl": 2 ** loss, "bpb": loss,
                                                       "acc": 0.5, "by_position": [], "recall": None,
                                                       "diagnostics": {}}))
        return RunOutcome(0)


def ablate(tmp_path, fake, *extra):
    return runner.main([PLAN, "--preset", "ci", "--out", str(tmp_path / "out"), "--no-progress", *extra], run_fn=fake)


def test_run_commands_contract(tmp_path):
    assert run_commands(tmp_path / "r") == [
        [sys.executable, "-m", "memtrans", "train", "--config", str(tmp_path / "r" / "config.yaml"),
         "--run-dir", str(tmp_path / "r"), "--resume"],
        [sys.executable, "-m", "memtrans", "eval", str(tmp_path / "r"), "--split", "test"],
    ]


def test_dry_run_lists_each_variant_once_and_shares_the_baseline(tmp_path, capsys):
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--dry-run", "--seeds", "2") == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r"\s*\d+\s+[0-9a-f]{12}\s", ln)]
    assert len(rows) == 28  # 14 variants x 2 seeds
    assert sum("baseline (shared by 5 studies)" in r for r in rows) == 2
    for variant in ["Memory Ablation: no memory", "Gating Mechanism: fixed 0.5 weight", "Memory Size: 8K",
                    "Memory Size: 262K", "Key/Query Normalization: no qk-norm", "Layer Position: multiple layers"]:
        assert sum(variant in r for r in rows) == 2, variant
    assert "model.memory_size=32" in out and "memory sizes scaled by 1/256" in out
    assert "28 runs (14 distinct configurations x 2 seed(s)" in out
    assert len({r.split()[1] for r in rows}) == 28  # one config hash per run
    assert fake.calls == [] and not (tmp_path / "out").exists()


def test_finished_runs_are_skipped_interrupted_resumed_changed_rerun(tmp_path):
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Ablation") == 0
    assert len(fake.calls) == 2  # baseline + no memory
    assert fake.commands[0] == run_commands(fake.calls[0])
    out = tmp_path / "out"
    assert (out / "REPORT.md").is_file() and (out / "results.csv").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(plan["runs"])
    for run_dir in fake.calls:  # named by the hash of the config it holds
        assert runner.config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).hash() == run_dir.name

    fake2 = FakeRun()
    assert ablate(tmp_path, fake2, "--only", "Memory Ablation") == 0
    assert fake2.calls == []

    interrupted = fake.calls[1]
    (interrupted / "status.json").write_text(json.dumps({"status": "running", "step": 10}))
    (interrupted / "eval.json").unlink()
    fake3 = FakeRun()
    assert ablate(tmp_path, fake3, "--only", "Memory Ablation") == 0
    assert fake3.calls == [interrupted] and "--resume" in fake3.commands[0][0]

    fake4 = FakeRun()
    assert ablate(tmp_path, fake4, "--only", "Memory Ablation", "--budget-tokens", "5000") == 0
    assert len(fake4.calls) == 2 and not set(fake4.calls) & set(fake.calls)
    assert yaml.safe_load((fake4.calls[0] / "config.yaml").read_text())["train"]["budget_tokens"] == 5000
    assert json.loads((out / "plan.json").read_text())["budget_tokens"] == 5000


def test_failed_run_is_recorded_and_the_rest_go_on(tmp_path):
    fake = FakeRun(fail_if=lambda cfg: not cfg["model"]["qk_norm"])
    assert ablate(tmp_path, fake, "--only", "Key/Query Normalization", "--only", "Memory Ablation") == 1
    assert len(fake.calls) == 3
    failed = [d for d in fake.calls if json.loads((d / "status.json").read_text())["status"] == "failed"]
    assert len(failed) == 1
    status = json.loads((failed[0] / "status.json").read_text())
    assert "exit code 3" in status["error"] and "boom" in status["error"] and status["step"] == 3
    assert "RuntimeError: boom" in (failed[0] / "error.txt").read_text()
    ok = [d for d in fake.calls if d not in failed]
    assert all(json.loads((d / "status.json").read_text())["status"] == "finished" for d in ok)
    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert "Failed runs:" in report and "boom" in report
    fake2 = FakeRun()  # a failed run is tried again next time; finished ones are not
    ablate(tmp_path, fake2, "--only", "Key/Query Normalization", "--only", "Memory Ablation")
    assert fake2.calls == failed


def test_crashing_run_function_is_a_failed_run(tmp_path):
    def crash(run_dir, commands):
        raise OSError("no such interpreter")

    assert ablate(tmp_path, crash, "--only", "Memory Ablation") == 1
    errors = sorted((tmp_path / "out" / "runs").glob("*/error.txt"))
    assert len(errors) == 2 and "no such interpreter" in errors[0].read_text()


def test_invalid_input_is_rejected_before_any_run(tmp_path):
    fake = FakeRun()
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        runner.main([PLAN, "--preset", "nope", "--out", str(tmp_path)], run_fn=fake)
    with pytest.raises(ValueError, match="--init-from .*no such run directory"):
        ablate(tmp_path, fake, "--init-from", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown config key 'gatee'"):
        ablate(tmp_path, fake, "--set", "model.gatee=fixed")
    with pytest.raises(ValueError, match="no such study"):
        ablate(tmp_path, fake, "--only", "Dropout")
    assert fake.calls == []


def test_init_from_and_set_reach_every_run(tmp_path):
    pre = tmp_path / "pretrained"
    pre.mkdir()
    fake = FakeRun()
    ablate(tmp_path, fake, "--only", "Memory Ablation", "--init-from", str(pre), "--set", "train.steps=20")
    cfgs = [yaml.safe_load((d / "config.yaml").read_text()) for d in fake.calls]
    assert all(c["train"]["init_from"] == str(pre.resolve()) and c["train"]["steps"] == 20 for c in cfgs)


def test_local_executor_runs_jobs_in_parallel(tmp_path):
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Size", "--jobs", "2") == 0
    assert len(fake.calls) == 5


def test_ray_executor_says_how_to_install(tmp_path):
    pytest.importorskip("memtrans")
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"pip install 'memtrans\[ray\]'"):
        ablate(tmp_path, FakeRun(), "--executor", "ray")


def test_last_metrics_reads_the_last_complete_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert runner.last_metrics(tmp_path) == {"step": 2, "loss": 1.5}
    assert runner.last_metrics(tmp_path / "nope") is None


def test_pretrain_steps_trains_one_no_memory_model_and_every_run_starts_from_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Ablation", "--pretrain-steps", "7") == 0
    pre, *runs = fake.calls
    assert pre.parent == Path("runs") / "pretrain" and fake.commands[0] == run_commands(pre)[:1]  # train only
    pre_cfg = yaml.safe_load((pre / "config.yaml").read_text())
    assert pre_cfg["model"]["memory_layers"] == [] and pre_cfg["train"]["steps"] == 7
    assert len(runs) == 2  # baseline + no memory
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["train"]["init_from"] == str(pre) and cfg["train"]["steps"] != 7
    # A finished pretrain with its checkpoint is reused: nothing is trained again.
    (pre / "checkpoints").mkdir()
    (pre / "checkpoints" / "latest.pt").write_bytes(b"x")
    again = FakeRun()
    assert ablate(tmp_path, again, "--only", "Memory Ablation", "--pretrain-steps", "7") == 0
    assert again.calls == []
    with pytest.raises(ValueError, match="excludes --init-from"):
        ablate(tmp_path, FakeRun(), "--pretrain-steps", "7", "--init-from", str(pre))


def test_a_lost_pretrain_is_not_retrained_when_its_runs_are_finished(tmp_path, monkeypatch, capsys):
    """Published results come without runs/pretrain (a fresh clone): re-running the command trains nothing, and
    the runs keep their names; a pretrain is trained again only for a run still to do."""
    import shutil
    monkeypatch.chdir(tmp_path)
    first = FakeRun()
    assert ablate(tmp_path, first, "--only", "Memory Ablation", "--pretrain-steps", "7") == 0
    pre, *runs = first.calls
    shutil.rmtree(tmp_path / "runs")  # the pretrain is gone
    again = FakeRun()
    assert ablate(tmp_path, again, "--only", "Memory Ablation", "--pretrain-steps", "7") == 0
    assert again.calls == [] and "not needed (2 runs from it are finished)" in capsys.readouterr().err
    shutil.rmtree(runs[0])  # one run to do: its pretrain is trained again, at the same path, then the run
    third = FakeRun()
    assert ablate(tmp_path, third, "--only", "Memory Ablation", "--pretrain-steps", "7") == 0
    assert third.calls == [pre, runs[0]]


def test_a_finished_training_keeps_its_status_when_its_eval_fails(tmp_path):
    """A run directory is one run: eval failing after a finished training is recorded in error.txt and the
    ablation's statuses, not by rewriting the training's status.json."""
    run = tmp_path / "r"
    run.mkdir()
    done = {"status": "finished", "step": 5, "error": None}
    (run / "status.json").write_text(json.dumps(done))
    assert runner.record_outcome(run, RunOutcome(2, "memtrans eval: error: no checkpoint\n", "memtrans eval r")) == "failed"
    assert json.loads((run / "status.json").read_text()) == done
    assert "exit code 2 from: memtrans eval r" in (run / "error.txt").read_text()
    (run / "status.json").write_text(json.dumps({"status": "running", "step": 3}))  # training itself failed
    assert runner.record_outcome(run, RunOutcome(1, "boom\n", "memtrans train r")) == "failed"
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_children_are_told_their_parent(tmp_path, monkeypatch):
    """run_subprocess puts this process's PID in MEMTRANS_PARENT_PID, so a child stops if ablate dies."""
    out = tmp_path / "r"
    out.mkdir()
    cmd = [sys.executable, "-c", "import os; print(os.environ['MEMTRANS_PARENT_PID'])"]
    assert runner.run_subprocess(out, [cmd]).returncode == 0
    assert (out / "stdout.log").read_text().strip() == str(os.getpid())


def test_ray_executor_runs_the_plan_when_ray_is_installed(tmp_path):
    """Real Ray tasks (a local cluster) with the real subprocess contract; skipped where Ray is not installed."""
    pytest.importorskip("ray")
    import ray

    out = tmp_path / "out"
    try:
        rc = runner.main([PLAN, "--preset", "ci", "--out", str(out), "--no-progress", "--executor", "ray",
                          "--only", "Memory Ablation", "--set", "train.steps=4", "--set", "eval.max_docs=1"])
    finally:
        ray.shutdown()
    assert rc == 0
    statuses = [json.loads(p.read_text())["status"] for p in out.glob("runs/*/status.json")]
    assert statuses == ["finished", "finished"]
    assert (out / "REPORT.md").exists()


def test_pretrain_matches_each_variants_non_memory_settings(tmp_path, monkeypatch):
    """A variant that changes more than the memory (qk-norm off) fine-tunes from a base pretrained like it."""
    monkeypatch.chdir(tmp_path)
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--only", "Key/Query Normalization", "--pretrain-steps", "5") == 0
    pretrains = [d for d in fake.calls if d.parent == Path("runs") / "pretrain"]
    assert len(pretrains) == 2
    qk_of = {str(d): yaml.safe_load((d / "config.yaml").read_text())["model"]["qk_norm"] for d in pretrains}
    assert sorted(qk_of.values()) == [False, True]
    for run in (d for d in fake.calls if d not in pretrains):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert qk_of[cfg["train"]["init_from"]] == cfg["model"]["qk_norm"]
    for d in pretrains:  # memory settings come from the plan's base, so memory variants share one pretrain
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["model"]["memory_layers"] == [] and cfg["model"]["gate"] == "learned_scalar"


def test_a_gate_learning_rate_study_shares_the_pretrains(tmp_path, monkeypatch):
    """optim.gate_lr_scale only touches gates, which a no-memory pretrain lacks: the pretrain is the same one."""
    monkeypatch.chdir(tmp_path)
    plain, scaled = FakeRun(), FakeRun()
    assert ablate(tmp_path / "a", plain, "--only", "Memory Ablation", "--pretrain-steps", "5") == 0
    pre = [d for d in plain.calls if d.parent == Path("runs") / "pretrain"]
    assert len(pre) == 1
    (pre[0] / "checkpoints").mkdir()
    (pre[0] / "checkpoints" / "latest.pt").write_bytes(b"x")  # finished with its checkpoint: reused if the same
    assert ablate(tmp_path / "b", scaled, "--only", "Memory Ablation", "--pretrain-steps", "5",
                  "--set", "optim.gate_lr_scale=30") == 0
    assert not [d for d in scaled.calls if d.parent == Path("runs") / "pretrain"]  # no second pretrain
    runs = scaled.calls
    assert len(runs) == 2 and {yaml.safe_load((d / "config.yaml").read_text())["train"]["init_from"] for d in runs} \
        == {str(pre[0])}
    assert {yaml.safe_load((d / "config.yaml").read_text())["optim"]["gate_lr_scale"] for d in runs} == {30}


def test_jobs_train_the_pretrains_side_by_side(tmp_path, monkeypatch):
    """With --jobs 2 the seeds' pretrains run at the same time (each waits at a barrier for the other: trained one
    after another, the first would time out), then every run starts from its own seed's pretrain."""
    import threading
    monkeypatch.chdir(tmp_path)
    both = threading.Barrier(2, timeout=10)
    fake = FakeRun()

    def run(run_dir, commands):
        if Path(run_dir).parent == Path("runs") / "pretrain":
            both.wait()
        return fake(run_dir, commands)

    assert ablate(tmp_path, run, "--only", "Memory Ablation", "--seeds", "2", "--pretrain-steps", "5",
                  "--jobs", "2") == 0
    pre = {yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"]: str(d)
           for d in fake.calls if d.parent == Path("runs") / "pretrain"}
    assert sorted(pre) == [0, 1]
    for d in (d for d in fake.calls if d.parent != Path("runs") / "pretrain"):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["train"]["init_from"] == pre[cfg["train"]["seed"]]


def test_preset_pretrain_overrides_reach_the_pretrain_only(tmp_path, monkeypatch):
    """The recall preset pretrains on short documents and fine-tunes every variant on long ones."""
    monkeypatch.chdir(tmp_path)
    fake = FakeRun()
    assert runner.main([PLAN, "--preset", "recall", "--out", str(tmp_path / "out"), "--no-progress",
                        "--only", "Memory Ablation", "--seeds", "1", "--pretrain-steps", "3"], run_fn=fake) == 0
    pre, *runs = fake.calls
    pre_cfg = yaml.safe_load((pre / "config.yaml").read_text())
    assert pre_cfg["data"]["recall_doc_len"] == 64 and pre_cfg["data"]["recall_docs"] == 3000
    assert pre_cfg["model"]["memory_layers"] == [] and pre_cfg["train"]["steps"] == 3
    assert len(runs) == 2
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"]["recall_doc_len"] == 256 and cfg["train"]["init_from"] == str(pre)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["preset"]["pretrain_overrides"]["data.recall_doc_len"] == 64


def test_dry_run_shows_identical_variants_as_identical(tmp_path, capsys):
    assert runner.main([PLAN, "--preset", "recall", "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Layer Position: bottom layer is identical to baseline at depth 2" in out
    assert "Layer Position: middle layer is identical to baseline at depth 2" in out
    assert "36 runs (12 distinct configurations x 3 seed(s); the baseline is shared by all 5 studies; " \
           "2 variant(s) identical to another)" in out


def test_one_pretrain_per_seed_and_each_seeds_variants_start_from_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [PLAN, "--preset", "recall", "--out", str(tmp_path / "out"), "--no-progress", "--only", "Memory Ablation",
            "--seeds", "2", "--pretrain-steps", "3"]
    assert runner.main(args + ["--dry-run"], run_fn=FakeRun()) == 0
    out = capsys.readouterr().out
    # recall pretrain: 3 steps x 16 documents x 32 tokens = 1,536 tokens per seed
    assert "pretrains: 2 (one per seed 0, 1 and distinct non-memory configuration), 3 steps each, 3,072 tokens" in out
    assert out.count("pretrain: seed ") == 2
    fake = FakeRun()
    assert runner.main(args, run_fn=fake) == 0
    pretrains = [d for d in fake.calls if d.parent == Path("runs") / "pretrain"]
    seed_of = {str(d): yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] for d in pretrains}
    assert sorted(seed_of.values()) == [0, 1]
    runs = [d for d in fake.calls if d not in pretrains]
    assert len(runs) == 4  # (baseline, no memory) x 2 seeds
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert seed_of[cfg["train"]["init_from"]] == cfg["train"]["seed"]
    record = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert sorted(p["seed"] for p in record["pretrains"].values()) == [0, 1]
    report_md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "2 no-memory models pretrained for 3 steps each (3,072 tokens in all" in report_md
    assert "each seed's variants fine-tune from that seed's pretrain, and the paired tables pair by seed" in report_md


class GpuFakeRun(FakeRun):
    """A FakeRun that takes the executor's env (CUDA_VISIBLE_DEVICES) and records which runs overlapped."""

    def __init__(self):
        super().__init__()
        import threading
        self.lock = threading.Lock()
        self.running: dict[str, str] = {}
        self.envs: list[dict | None] = []
        self.overlaps: list[dict[str, str]] = []

    def __call__(self, run_dir, commands, env=None):
        import time
        with self.lock:
            self.envs.append(env)
            if env:
                self.running[str(run_dir)] = env["CUDA_VISIBLE_DEVICES"]
                self.overlaps.append(dict(self.running))
        time.sleep(0.3)
        with self.lock:
            self.running.pop(str(run_dir), None)
        return super().__call__(run_dir, commands)


@pytest.fixture
def fake_gpus(monkeypatch):
    """This CPU machine pretends to have 3 CUDA devices (bf16 assumed, so no device query is made)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("MEMTRANS_BF16", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_jobs_pin_each_cuda_run_to_one_gpu_the_least_busy(tmp_path, fake_gpus, monkeypatch):
    fake = GpuFakeRun()
    assert ablate(tmp_path, fake, "--only", "Gating Mechanism", "--jobs", "3", "--set", "train.device=cuda") == 0
    assert len(fake.envs) == 4 and all(set(e) == {"CUDA_VISIBLE_DEVICES"} for e in fake.envs)
    assert {e["CUDA_VISIBLE_DEVICES"] for e in fake.envs} == {"0", "1", "2"}
    for running in fake.overlaps:  # runs that ran at the same time never shared a GPU (3 jobs, 3 GPUs)
        assert len(set(running.values())) == len(running)
    assert max(len(r) for r in fake.overlaps) >= 2
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["gpus"] == ["0", "1", "2"]
    # the parent's own CUDA_VISIBLE_DEVICES is what is handed out; cuda:N runs and CPU runs are not pinned
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert runner.visible_gpus() == ["5", "6", "7"]
    fake = GpuFakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Ablation", "--jobs", "2", "--set", "train.device=cuda:1") == 0
    assert fake.envs == [None, None]
    fake = GpuFakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Ablation", "--jobs", "2") == 0  # ci: train.device cpu
    assert fake.envs == [None, None]


def test_gpu_pool_spreads_more_jobs_than_gpus_evenly():
    pool = runner.GpuPool(["0", "1"])
    got = [pool.acquire() for _ in range(5)]
    assert got == [0, 1, 0, 1, 0] and pool.busy == [3, 2]
    pool.release(0)
    pool.release(0)
    assert pool.acquire() == 0 and pool.busy == [2, 2]


def test_ray_executor_requests_gpus_when_runs_use_cuda(tmp_path, fake_gpus, monkeypatch):
    """A stand-in `ray` module records what the executor asks Ray for."""
    import types
    asked = []

    class Ref:
        def __init__(self, value):
            self.value = value

    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 8.0, "GPU": 2.0},
        remote=lambda **kw: asked.append(kw) or (lambda fn: types.SimpleNamespace(remote=lambda *a: Ref(fn(*a)))),
        wait=lambda refs, num_returns, timeout: (refs, []), get=lambda ref: ref.value, cancel=lambda ref, force: None)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    fake = FakeRun()
    assert ablate(tmp_path, fake, "--only", "Memory Ablation", "--executor", "ray", "--set", "train.device=auto") == 0
    assert asked == [{"num_cpus": 1, "num_gpus": 1, "max_retries": 0}] and len(fake.calls) == 2
    asked.clear()
    assert ablate(tmp_path, FakeRun(), "--only", "Memory Ablation", "--executor", "ray") == 0  # ci: device cpu
    assert asked == [{"num_cpus": 1, "num_gpus": 0, "max_retries": 0}]
    asked.clear()
    fake_ray.cluster_resources = lambda: {"CPU": 8.0}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="the Ray cluster reports no GPU"):
        ablate(tmp_path, FakeRun(), "--only", "Memory Ablation", "--executor", "ray", "--set", "train.device=cuda")
