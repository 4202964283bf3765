"""`memtrans ablate PLAN --preset NAME`: run every (variant, seed) of a plan, then write the report.

Each run lives in OUT/runs/<config hash>. A run whose status.json says finished/diverged and whose
eval.json exists is skipped; any other existing run is started again with --resume (the trainer
picks up its checkpoint). A run is two subprocesses, given by `run_commands` (the contract with the
trainer and the evaluator). A failed run is recorded (status.json, error.txt) and the rest go on.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from memtrans.ablation.plan import (BASELINE, ResolvedPlan, RunSpec, estimate_cost, format_seconds, load_plan,
                                    resolve)
from memtrans.config import Config, apply_overrides, config_from_dict, parse_override, save_config
from memtrans.device import policy_of, resolve_config
from memtrans.utils import (PARENT_ENV, DirLock, Interrupted, atomic_write_json, atomic_write_text, clean_stale_tmp,
                            handle_signals, read_json, stale_lock_note)

DONE_STATUSES = ("finished", "diverged")
ERROR_TAIL_CHARS = 4000


def run_commands(run_dir: Path, split: str = "test") -> list[list[str]]:
    """The commands one run issues, in order (the trainer / evaluator CLI contract)."""
    run_dir = Path(run_dir)
    py = sys.executable
    return [
        [py, "-m", "memtrans", "train", "--config", str(run_dir / "config.yaml"), "--run-dir", str(run_dir),
         "--resume"],
        [py, "-m", "memtrans", "eval", str(run_dir), "--split", split],
    ]


@dataclass
class RunOutcome:
    returncode: int
    stderr_tail: str = ""
    command: str = ""  # the command that failed, if any


RunFn = Callable[[Path, list[list[str]]], RunOutcome]


# The child processes of this `memtrans ablate` (pid -> Popen), so that a stop reaches them (forward_signal), and
# the signal that stopped it (None while running).
CHILDREN: dict[int, subprocess.Popen] = {}
STOPPED: list[int] = []
# the ablation prints the fused kernel's state once; its children do not repeat it per command
CHILD_WARNING_FILTER = "ignore:memtrans fused top-k kernel unavailable"


def forward_signal(signum: int, first: bool) -> None:
    """Signal handler work (handle_signals): pass a SIGTERM / SIGINT on to every child's process group; a
    second signal kills them (SIGKILL)."""
    if not STOPPED:
        STOPPED.append(signum)
    for proc in list(CHILDREN.values()):
        try:
            os.killpg(proc.pid, signum if first else signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_subprocess(run_dir: Path, commands: list[list[str]], threads: int | None = None,
                   env: dict[str, str] | None = None) -> RunOutcome:
    """Default run function: the commands one after another; output appended to RUN/stdout.log, stderr.log.
    `env` adds to the environment (e.g. CUDA_VISIBLE_DEVICES from the GPU schedule).

    Each child runs in its own session (a terminal's Ctrl-C reaches it once, through forward_signal); after
    a stop no further command starts."""
    run_dir = Path(run_dir)
    extra_env = env or {}
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra_env)
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), CHILD_WARNING_FILTER) if w)
    env[PARENT_ENV] = str(os.getpid())  # the child stops if this process dies, SIGKILL included (stop_with_parent)
    for cmd in commands:
        if STOPPED:
            return RunOutcome(128 + STOPPED[0], "stopped before it started\n", shlex.join(cmd))
        with open(run_dir / "stdout.log", "ab") as out, open(run_dir / "stderr.log", "ab") as err:
            start = err.tell()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
            CHILDREN[proc.pid] = proc
            try:
                if STOPPED:  # the stop came while it started: forward_signal may have missed it
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, STOPPED[0])
                rc = proc.wait()
            except BaseException:  # Interrupted in the main thread (pretrain): wait for the child it signalled
                proc.wait()
                raise
            finally:
                CHILDREN.pop(proc.pid, None)
        if rc != 0:
            with open(run_dir / "stderr.log", "rb") as err:
                err.seek(max(start, err.seek(0, 2) - ERROR_TAIL_CHARS))
                tail = err.read().decode(errors="replace")
            return RunOutcome(rc, tail, shlex.join(cmd))
    return RunOutcome(0)


# ----------------------------------------------------------------------------------- run state

def is_done(run_dir: Path) -> bool:
    """Finished (or diverged, which is a result too) and evaluated: nothing left to do."""
    status = read_json(Path(run_dir) / "status.json") or {}
    return status.get("status") in DONE_STATUSES and (Path(run_dir) / "eval.json").is_file()


def last_metrics(run_dir: Path) -> dict | None:
    """The last complete line of RUN/metrics.jsonl (read from the end; the file may be growing)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def record_outcome(run_dir: Path, outcome: RunOutcome) -> str:
    """Turn a finished subprocess sequence into the run's final status; failures go to status.json + error.txt."""
    status = read_json(run_dir / "status.json") or {}
    if outcome.returncode == 0 and is_done(run_dir):
        return status["status"]
    trained = status.get("status") in DONE_STATUSES  # training finished; a later command (eval) failed
    if outcome.returncode == 0:
        error = "the commands succeeded but status.json is not finished/diverged or eval.json is missing"
    else:
        error = f"exit code {outcome.returncode} from: {outcome.command}"
    atomic_write_text(run_dir / "error.txt", f"{error}\n\n{outcome.stderr_tail}".rstrip() + "\n")
    lines = [ln for ln in outcome.stderr_tail.strip().splitlines() if ln.strip()]
    summary = f"{error}: {lines[-1].strip()}" if lines else error
    if not trained:  # a finished training's status.json stays as train wrote it (a run directory is one run)
        atomic_write_json(run_dir / "status.json", {**status, "status": "failed", "error": summary})
    return "failed"


# ------------------------------------------------------------------------------------ executors

@dataclass
class RunJob:
    spec: RunSpec
    run_dir: Path
    commands: list[list[str]]
    label: str
    resumed: bool

    @property
    def steps(self) -> int:
        return int(self.spec.config["train"]["steps"])


class Executor(Protocol):
    def submit(self, job: RunJob) -> None: ...
    def wait(self, timeout: float) -> list[tuple[RunJob, RunOutcome]]: ...  # runs completed since last call
    def active(self) -> list[RunJob]: ...
    def close(self) -> None: ...


def _crash(e: BaseException) -> RunOutcome:
    return RunOutcome(1, f"{type(e).__name__}: {e}", "run function")


def uses_cuda(device: str, cuda_here: bool | None = None) -> bool:
    """Whether a run whose train.device is `device` computes on a GPU (auto: when this machine has CUDA)."""
    if device == "auto":
        return torch_cuda_available() if cuda_here is None else cuda_here
    return device.startswith("cuda")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES entries: those the parent's own
    CUDA_VISIBLE_DEVICES lists (ids or UUIDs), else 0..device_count-1; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return parent[:n] if parent else [str(i) for i in range(n)]


class GpuPool:
    """GPU schedule of the local executor: a run that computes on CUDA (train.device auto or cuda) is pinned to
    one GPU through its child processes' CUDA_VISIBLE_DEVICES, the GPU running the fewest runs when it starts
    (lowest index on ties): round-robin while runs take equally long, never two on one GPU while another is idle.
    `--jobs N` with G GPUs: N <= G gives every run a GPU of its own; N > G shares them evenly. A run naming
    cuda:N itself is not pinned (with one visible GPU, cuda:1 would not exist)."""

    def __init__(self, gpus: list[str]):
        self.gpus = list(gpus)
        self.busy = [0] * len(self.gpus)
        self.lock = threading.Lock()

    def acquire(self) -> int:
        with self.lock:
            i = min(range(len(self.gpus)), key=lambda j: (self.busy[j], j))
            self.busy[i] += 1
            return i

    def release(self, i: int) -> None:
        with self.lock:
            self.busy[i] -= 1


class LocalExecutor:
    """Runs on this machine, `jobs` runs at a time (threads that each wait on a subprocess); on a machine with
    GPUs, runs on CUDA are spread over them (GpuPool)."""

    def __init__(self, jobs: int = 1, run_fn: RunFn | None = None, gpus: list[str] | None = None):
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        self.run_fn = run_fn or functools.partial(run_subprocess, threads=threads)
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs)
        self.futures: dict[cf.Future, RunJob] = {}
        self.gpus = GpuPool(gpus) if gpus else None

    def _run(self, job: RunJob) -> RunOutcome:
        device = str(job.spec.config["train"]["device"])
        if self.gpus is None or device not in ("auto", "cuda"):
            return self.run_fn(job.run_dir, job.commands)
        i = self.gpus.acquire()
        try:
            return self.run_fn(job.run_dir, job.commands, env={"CUDA_VISIBLE_DEVICES": self.gpus.gpus[i]})
        finally:
            self.gpus.release(i)

    def submit(self, job: RunJob) -> None:
        self.futures[self.pool.submit(self._run, job)] = job

    def wait(self, timeout: float) -> list[tuple[RunJob, RunOutcome]]:
        if not self.futures:
            return []
        done, _ = cf.wait(self.futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        results = []
        for f in done:
            job = self.futures.pop(f)
            try:
                results.append((job, f.result()))
            except Exception as e:  # a bug in a run function must not stop the study
                results.append((job, _crash(e)))
        return results

    def active(self) -> list[RunJob]:
        return [job for f, job in self.futures.items() if f.running()]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Runs as Ray tasks (RAY_ADDRESS selects a cluster; default a local one). Run directories must be on a
    file system every worker sees, and workers need the same Python environment (commands use sys.executable)."""

    def __init__(self, cpus_per_run: int = 1, run_fn: RunFn | None = None, gpus_per_run: float | None = None,
                 devices: set[str] | None = None):
        """`gpus_per_run` None: 1 when the runs compute on CUDA (train.device cuda, or auto while this machine or
        the cluster has GPUs), else 0. Ray then sets each task's CUDA_VISIBLE_DEVICES, which its runs inherit;
        without num_gpus it would hide every GPU and `auto` would silently train on CPU."""
        try:
            import ray
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'memtrans[ray]' (or use --executor local)") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        cluster_gpus = float((ray.cluster_resources() or {}).get("GPU", 0))
        if gpus_per_run is None:
            cuda = any(uses_cuda(d, torch_cuda_available() or cluster_gpus > 0) for d in (devices or {"auto"}))
            gpus_per_run = 1 if cuda else 0
            if cuda and cluster_gpus == 0:
                raise ValueError("the runs compute on CUDA (train.device) but the Ray cluster reports no GPU; "
                                 "set train.device=cpu or start Ray with GPUs")
        self.gpus_per_run = gpus_per_run
        fn = run_fn or functools.partial(run_subprocess, threads=cpus_per_run)

        def task(run_dir: Path, commands: list[list[str]]) -> RunOutcome:  # ray.remote takes functions, not partials
            return fn(run_dir, commands)

        self.remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(task)
        self.pending: dict[Any, RunJob] = {}

    def submit(self, job: RunJob) -> None:
        self.pending[self.remote.remote(job.run_dir, job.commands)] = job

    def wait(self, timeout: float) -> list[tuple[RunJob, RunOutcome]]:
        if not self.pending:
            return []
        done, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout)
        results = []
        for ref in done:
            job = self.pending.pop(ref)
            try:
                results.append((job, self.ray.get(ref)))
            except Exception as e:
                results.append((job, _crash(e)))
        return results

    def active(self) -> list[RunJob]:  # Ray does not say which tasks started; show the ones writing metrics
        return [job for job in self.pending.values() if (job.run_dir / "metrics.jsonl").exists()]

    def close(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)


# ------------------------------------------------------------------------------------- progress

class Progress:
    """Overall and per-study progress plus one line per active run (step, loss, ETA from its metrics.jsonl).

    Bars on a terminal (tqdm); plain lines otherwise (CI logs)."""

    def __init__(self, resolved: ResolvedPlan, done: set[str], enabled: bool = True, stream=None):
        from tqdm.auto import tqdm

        self.tqdm = tqdm
        self.stream = stream or sys.stderr
        self.bars = enabled and self.stream.isatty()
        self.quiet = not enabled
        self.study_runs = {s.name: {h for v in variants for h in v.runs} for s, variants in resolved.studies}
        self.done = set(done)
        self.total = len(resolved.runs)
        self.overall = tqdm(total=self.total, initial=len(self.done), desc="runs", file=self.stream,
                            disable=not self.bars, position=0, dynamic_ncols=True)
        self.run_bars: dict[str, Any] = {}
        self.last_line = 0.0

    def studies_text(self) -> str:
        return " | ".join(f"{name} {len(runs & self.done)}/{len(runs)}" for name, runs in self.study_runs.items())

    def write(self, text: str) -> None:
        if not self.quiet:
            self.tqdm.write(text, file=self.stream)

    def started(self, job: RunJob) -> None:
        self.write(f"start    {job.label} ({'resume' if job.resumed else 'new'}) -> {job.run_dir}")

    def finished(self, job: RunJob, status: str, seconds: float) -> None:
        self.done.add(job.spec.hash)
        bar = self.run_bars.pop(job.spec.hash, None)
        if bar is not None:
            bar.close()
        self.overall.update(1)
        self.overall.set_postfix_str(self.studies_text(), refresh=True)
        self.write(f"{status:<9}{job.label} in {format_seconds(seconds)} "
                   f"[{len(self.done)}/{self.total} runs; {self.studies_text()}]")

    def refresh(self, active: list[RunJob]) -> None:
        now = time.time()
        lines = []
        for job in active:
            row = last_metrics(job.run_dir) or {}
            step, loss, tps = row.get("step", 0), row.get("loss"), row.get("tokens_per_s")
            cfg = job.spec.config
            eta = ""
            if tps:
                left = (job.steps - step) * cfg["data"]["batch_size"] * cfg["model"]["segment_len"] / tps
                eta = f" eta {format_seconds(max(0.0, left))}"
            text = f"loss {loss:.3f}{eta}" if isinstance(loss, (int, float)) else "starting"
            if self.bars:
                bar = self.run_bars.get(job.spec.hash)
                if bar is None:
                    bar = self.run_bars[job.spec.hash] = self.tqdm(
                        total=job.steps, desc=job.label[:48], file=self.stream, leave=False,
                        position=len(self.run_bars) + 1, dynamic_ncols=True,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} {postfix}")
                bar.n = step
                bar.set_postfix_str(text, refresh=True)
            else:
                lines.append(f"  ...  {job.label}: step {step}/{job.steps} {text}")
        if lines and now - self.last_line >= 60:
            self.last_line = now
            for line in lines:
                self.write(line)

    def close(self) -> None:
        for bar in self.run_bars.values():
            bar.close()
        self.overall.close()


# ------------------------------------------------------------------------------------ running

def run_label(spec: RunSpec) -> str:
    names = "; ".join(v if s == "*" else f"{s}: {v}" for s, v in spec.members)
    return f"{names} (seed {spec.seed})"


def environment() -> dict:
    """Hardware and software of the machine that ran the plan (without importing torch)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip()
            gpu = "; ".join(out.splitlines()) or None
        except (OSError, subprocess.SubprocessError):
            pass
    versions = {"python": platform.python_version()}
    for pkg in ("memtrans", "torch", "numpy", "faiss-cpu", "faiss-gpu", "faiss"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(), "versions": versions}


def write_record(out: Path, record: dict) -> None:
    atomic_write_json(out / "plan.json", record)


def execute(resolved: ResolvedPlan, out: Path, executor: Executor, meta: dict | None = None,
            progress: bool = True, poll_s: float = 1.0) -> dict[str, str]:
    """Run every run of `resolved` not already done; returns {hash: status} for all runs."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {**resolved.record(), **(meta or {}), "environment": environment(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_time_s": None}
    write_record(out, record)
    statuses: dict[str, str] = {}
    jobs = []
    for h, spec in resolved.runs.items():
        run_dir = out / "runs" / h
        if is_done(run_dir):
            statuses[h] = (read_json(run_dir / "status.json") or {})["status"]
            continue
        resumed = (run_dir / "status.json").exists() or (run_dir / "checkpoints").exists()
        if not (run_dir / "config.yaml").is_file():  # a started run keeps the config its trainer recorded
            save_config(config_from_dict(spec.config), run_dir / "config.yaml")
        jobs.append(RunJob(spec, run_dir, run_commands(run_dir), run_label(spec), resumed))
    display = Progress(resolved, done=set(statuses), enabled=progress)
    if statuses:
        display.write(f"skip     {len(statuses)} finished run(s) already in {out / 'runs'}")
    begun: dict[str, float] = {}
    try:
        for job in jobs:
            executor.submit(job)
        remaining = len(jobs)
        while remaining:
            for job in executor.active():
                if job.spec.hash not in begun:
                    begun[job.spec.hash] = time.time()
                    display.started(job)
            for job, outcome in executor.wait(poll_s):
                now = time.time()
                remaining -= 1
                status = record_outcome(job.run_dir, outcome)
                statuses[job.spec.hash] = status
                if job.spec.hash not in begun:
                    display.started(job)
                display.finished(job, status, now - begun.get(job.spec.hash, now))
            display.refresh(executor.active())
    except Interrupted as e:
        display.close()
        executor.close()  # waits for the running children, which forward_signal has stopped
        for job in jobs:
            if job.spec.hash not in statuses:
                status = read_json(job.run_dir / "status.json") or {}
                if status.get("status") in ("running", "interrupted") or (job.spec.hash in begun and not status):
                    atomic_write_json(job.run_dir / "status.json", {
                        **status, "status": "interrupted",
                        "error": f"{e} (memtrans ablate stopped); run the same command again to resume it"})
                    statuses[job.spec.hash] = "interrupted"
        raise
    finally:
        display.close()
        executor.close()
        record["wall_time_s"] = round(time.time() - started, 1)
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record["statuses"] = statuses
        write_record(out, record)
    return statuses


# ----------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memtrans ablate", description="Run an ablation plan and write its report.")
    p.add_argument("plan", help="plan YAML, e.g. plans/memorizing_transformers.yaml")
    p.add_argument("--preset", required=True, help="budget preset defined in the plan (e.g. ci, demo, small, paper)")
    p.add_argument("--dry-run", action="store_true", help="list the runs it would make and their cost; run nothing")
    p.add_argument("--out", help="output directory (default runs/ablations/<plan>-<preset>)")
    p.add_argument("--seeds", type=int, help="number of seeds (0..N-1), instead of the preset's")
    p.add_argument("--only", action="append", metavar="STUDY", help="run only this study (repeatable); "
                   "the baseline is always run")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--jobs", type=int, default=1, help="local executor: runs in parallel (default 1); with GPUs, "
                   "each run on CUDA is pinned to one, the least busy (--jobs = number of GPUs fills them)")
    p.add_argument("--cpus-per-run", type=int, default=1, help="ray executor: CPUs reserved per run")
    p.add_argument("--gpus-per-run", type=float, default=None,
                   help="ray executor: GPUs reserved per run (default 1 when the runs compute on CUDA, else 0)")
    p.add_argument("--budget-minutes", type=float, help="per-run wall-clock budget (train.budget_minutes)")
    p.add_argument("--budget-tokens", type=int, help="per-run token budget (train.budget_tokens)")
    p.add_argument("--init-from", metavar="RUN_OR_CKPT",
                   help="fine-tune every variant from this run dir or checkpoint (train.init_from)")
    p.add_argument("--pretrain-steps", type=int, metavar="N",
                   help="the paper's fine-tuning recipe in one command: per seed, train a no-memory model for N "
                        "steps (runs/pretrain/<hash>, reused when finished) and fine-tune that seed's variants from "
                        "it; variants that change more than the memory (e.g. qk_norm) get a pretrain of their own")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run, e.g. data.corpus=jsonl:/data/pg19.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for text in args.set:
        keys, value = parse_override(text)
        extra[".".join(keys)] = value
    if args.budget_minutes is not None:
        extra["train.budget_minutes"] = args.budget_minutes
    if args.budget_tokens is not None:
        extra["train.budget_tokens"] = args.budget_tokens
    if args.init_from is not None:
        path = Path(args.init_from)
        if not path.exists():
            raise ValueError(f"--init-from {args.init_from}: no such run directory or checkpoint")
        extra["train.init_from"] = str(path.resolve())
    return extra


def dry_run_text(resolved: ResolvedPlan, out: Path) -> str:
    preset, plan = resolved.preset, resolved.plan
    lines = [f"plan {plan.name} ({plan.path}), preset {preset.name}: {preset.description}",
             f"memory sizes scaled by {preset.memory_size_scale} (nominal -> run): " + ", ".join(
                 sorted({f"{v.memory_size_nominal}->{v.memory_size}" for _, vs in resolved.studies for v in vs},
                        key=lambda s: int(s.split("-")[0]))),
             "preset overrides: " + " ".join(f"{k}={v}" for k, v in preset.overrides.items())]
    if resolved.extra_overrides:
        lines.append("command-line overrides: " + " ".join(f"{k}={v}" for k, v in resolved.extra_overrides.items()))
    lines.append(f"seeds: {', '.join(map(str, resolved.seeds))}; output: {out}")
    lines.append("")
    header = f"{'#':>3}  {'hash':<12}  {'seed':>4}  {'study: variant':<48}  {'overrides':<40}  {'tokens':>12}  {'est.':>8}"
    lines += [header, "-" * len(header)]
    total_tokens, total_s, done = 0, 0.0, 0
    for i, (h, spec) in enumerate(resolved.runs.items(), 1):
        est = estimate_cost(spec.config, preset.est_flops_per_s)
        total_tokens += est["tokens"]
        total_s += est["seconds"]
        finished = is_done(out / "runs" / h)
        done += finished
        if spec.members[0][1] == BASELINE:
            who = f"baseline (shared by {len(resolved.studies)} studies)"
        else:
            who = "; ".join(f"{s}: {v}" for s, v in spec.members)
        ov = " ".join(f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()) or "-"
        lines.append(f"{i:>3}  {h:<12}  {spec.seed:>4}  {who:<48}  {ov:<40}  {est['tokens']:>12,}  "
                     f"{format_seconds(est['seconds']):>8}" + ("  (finished, skip)" if finished else ""))
    n_variants = len({(s, v) for spec in resolved.runs.values() for s, v in spec.members[:1]})
    identical = [(s.name, v) for s, vs in resolved.studies for v in vs if v.identical_to]
    if identical:
        lines += ["", "identical variants (the same configuration, so the same runs; reported as identical, never "
                      "compared):"]
        lines += [f"  {study}: {v.name} is {v.identity()}" for study, v in identical]
    lines += ["", f"{len(resolved.runs)} runs ({n_variants} distinct configurations x {len(resolved.seeds)} seed(s); "
                  f"the baseline is shared by all {len(resolved.studies)} studies"
                  + (f"; {len(identical)} variant(s) identical to another" if identical else "")
                  + f"), {total_tokens:,} tokens, roughly "
                  f"{format_seconds(total_s)} run one at a time (estimate at {preset.est_flops_per_s:.2g} flop/s)"
                  + (f"; {done} already finished" if done else "")]
    return "\n".join(lines)


# Fields that only matter to a memory model: a run's pretrained starting point takes them from the plan's base,
# so variants that differ only in memory share one pretrain, while e.g. model.qk_norm=false gets its own.
MEMORY_FIELDS = ("memory_layers", "memory_size", "knn_k", "gate", "fixed_gate", "memory_backend", "memory_dtype",
                 "score_dtype", "ivf_nlist", "ivf_nprobe")


def pretrain_config(resolved: ResolvedPlan, run_config: dict, steps: int) -> Config:
    """The starting point of one run under the fine-tuning recipe: its config without memory, with the run's own
    seed (one pretrain per seed, so intervals over seeds include the starting point's variance and the paired
    analysis pairs a variant with the baseline fine-tuned from the same weights), plus the preset's
    pretrain_overrides."""
    base_model = config_from_dict(resolved.base_config).model
    model = {f: getattr(base_model, f) for f in MEMORY_FIELDS} | {"memory_layers": []}
    # a no-memory model has no gates: their lr multiplier takes its default, so a study of it shares the pretrains
    data = apply_overrides(run_config, {**{f"model.{k}": v for k, v in model.items()}, "train.steps": steps,
                                        "optim.gate_lr_scale": 1.0,
                                        "train.seed": int(run_config["train"]["seed"]), "train.init_from": None,
                                        **resolved.preset.pretrain_overrides})
    return resolve_config(config_from_dict(data))


def pretrain_cost_text(pretrains: dict[str, Config], flops_per_s: float) -> str:
    """One line for --dry-run: how many pretrains, their steps, tokens and estimated time."""
    costs = [estimate_cost(c.to_dict(), flops_per_s) for c in pretrains.values()]
    seeds = sorted({c.train.seed for c in pretrains.values()})
    steps = sorted({c.train.steps for c in pretrains.values()})
    return (f"pretrains: {len(pretrains)} (one per seed {', '.join(map(str, seeds))} and distinct non-memory "
            f"configuration), {'/'.join(map(str, steps))} steps each, {sum(c['tokens'] for c in costs):,} tokens, "
            f"roughly {format_seconds(sum(c['seconds'] for c in costs))} (estimate at {flops_per_s:.2g} flop/s)")


def with_init_from(resolved: ResolvedPlan, init_of: dict[str, str]) -> ResolvedPlan:
    """The same plan with train.init_from set per run (run hashes change accordingly)."""
    remap, runs = {}, {}
    for h, spec in resolved.runs.items():
        cfg = apply_overrides(spec.config, {"train.init_from": init_of[h]})
        new = config_from_dict(cfg).hash()
        remap[h] = new
        runs[new] = dataclasses.replace(spec, hash=new, config=cfg)
    studies = [(s, [dataclasses.replace(v, runs=[remap[h] for h in v.runs]) for v in vs]) for s, vs in resolved.studies]
    return dataclasses.replace(resolved, runs=runs, studies=studies)


def pretrain(cfg: Config, run_fn: RunFn | None = None) -> Path:
    """Train the no-memory starting model once; a finished one (with its checkpoint) is reused.

    It lives in runs/pretrain/<config hash> relative to the working directory, so every variant's config
    names it by the same relative path and run hashes stay the same across checkouts and sittings
    (training is deterministic on CPU, so a pretrain that was lost is retrained to the same weights)."""
    run_dir = Path("runs") / "pretrain" / cfg.hash()
    done = (read_json(run_dir / "status.json") or {}).get("status") == "finished"
    if done and (run_dir / "checkpoints" / "latest.pt").exists():
        return run_dir
    if done:  # results kept without checkpoints: train again from scratch into a fresh directory
        run_dir = run_dir.with_name(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    print(f"pretrain {cfg.train.steps} steps without memory -> {run_dir}", file=sys.stderr, flush=True)
    outcome = (run_fn or run_subprocess)(run_dir, run_commands(run_dir)[:1])
    if STOPPED:
        raise Interrupted(STOPPED[0])
    if outcome.returncode != 0:
        raise ValueError(f"pretraining failed (see {run_dir}/stderr.log): {outcome.stderr_tail[-500:]}")
    return run_dir


def train_pretrains(cfgs: dict[str, Config], jobs: int, run_fn: RunFn | None = None) -> dict[str, str]:
    """hash -> directory of each pretrain, trained `jobs` at a time on CPU (each with cores / jobs threads, as the
    local executor gives runs); on CUDA one after another, since a pretrain is not pinned to a GPU of its own."""
    on_cuda = any(uses_cuda(str(c.train.device)) for c in cfgs.values())
    jobs = 1 if on_cuda else max(1, min(jobs, len(cfgs)))
    if jobs == 1:
        return {h: str(pretrain(c, run_fn)) for h, c in cfgs.items()}
    run = run_fn or functools.partial(run_subprocess, threads=max(1, (os.cpu_count() or 1) // jobs))
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {h: pool.submit(pretrain, c, run) for h, c in cfgs.items()}
        return {h: str(f.result()) for h, f in futures.items()}


def main(argv: list[str] | None = None, run_fn: RunFn | None = None) -> int:
    """The CLI. While it runs (not --dry-run) OUT/.ablate.lock keeps a second `memtrans ablate` off the same
    --out, and SIGTERM / SIGINT are passed on to the runs' processes: it waits for them, records their runs as
    `interrupted` and exits 128 + the signal's number."""
    args = build_parser().parse_args(argv)
    STOPPED.clear()
    if args.dry_run:
        return _main(args, argv, run_fn)
    out = Path(args.out or Path("runs") / "ablations" / f"{Path(args.plan).stem}-{args.preset}")
    with DirLock(out, ".ablate.lock", "the ablation output directory") as lock:
        note = stale_lock_note(lock)
        if note:
            print(f"memtrans ablate: {note}", file=sys.stderr, flush=True)
        removed = clean_stale_tmp(out) + clean_stale_tmp(out / "plots")
        if removed:
            print(f"memtrans ablate: removed {len(removed)} temporary file(s) of interrupted writes in {out}",
                  file=sys.stderr, flush=True)
        try:
            with handle_signals(forward_signal):
                return _main(args, argv, run_fn)
        except Interrupted as e:
            print(f"memtrans ablate: {e}: the running runs were stopped and recorded as interrupted; run the same "
                  f"command again to resume them (finished runs are kept)", file=sys.stderr, flush=True)
            return e.exit_code


def kernel_note(cfg: Config) -> str | None:
    """Why the fused top-k kernel does not run here, when a run of the plan would use it (said once per
    ablation instead of by every run)."""
    if not cfg.model.memory_layers or cfg.model.memory_backend != "exact":
        return None
    try:
        from memtrans.memory import fast_topk

        reason = fast_topk.unavailable_reason() if hasattr(fast_topk, "unavailable_reason") else None
    except Exception as e:  # the note must never stop a study
        reason = f"{type(e).__name__}: {e}"
    return None if reason is None else f"the fused top-k kernel is unavailable ({reason}); retrieval uses the torch path"


def _main(args: argparse.Namespace, argv: list[str] | None, run_fn: RunFn | None) -> int:
    plan = load_plan(args.plan)
    seeds = list(range(args.seeds)) if args.seeds is not None else None
    if seeds is not None and not seeds:
        raise ValueError("--seeds must be >= 1")
    if args.pretrain_steps is not None and (args.init_from is not None or args.pretrain_steps < 1):
        raise ValueError("--pretrain-steps takes a positive number of steps and excludes --init-from")
    resolved = resolve(plan, args.preset, seeds=seeds, only=args.only, extra_overrides=cli_overrides(args))
    from memtrans.train.trainer import check_values

    for h, spec in resolved.runs.items():  # values a run would refuse, before any run starts
        try:
            check_values(config_from_dict(spec.config))
        except ValueError as e:
            raise ValueError(f"{args.plan}, preset {args.preset}, run {run_label(spec)}: {e}") from None
    out = Path(args.out or Path("runs") / "ablations" / f"{Path(args.plan).stem}-{args.preset}")
    base = config_from_dict(resolved.base_config)
    print(f"memtrans ablate: {policy_of(base).describe()}", flush=True)
    note = None if args.dry_run or base.train.device not in ("cpu", "auto") else kernel_note(base)
    if note:
        print(f"memtrans ablate: note: {note}", flush=True)
    pretrains: dict[str, dict] = {}
    if args.pretrain_steps:
        starts = {h: pretrain_config(resolved, spec.config, args.pretrain_steps) for h, spec in resolved.runs.items()}
        distinct = {cfg.hash(): cfg for cfg in starts.values()}
        if args.dry_run:
            print(pretrain_cost_text(distinct, resolved.preset.est_flops_per_s))
        dirs: dict[str, str] = {}
        to_train: dict[str, Config] = {}
        # a pretrain whose fine-tunes have all finished (e.g. published results in a fresh clone) is not trained
        # again: its runs keep their names, which name its canonical directory
        canonical = with_init_from(resolved, {h: str(Path("runs") / "pretrain" / c.hash()) for h, c in starts.items()})
        new_hash = dict(zip(resolved.runs, canonical.runs))
        for h, cfg in distinct.items():
            dependents = [new_hash[r] for r, c in starts.items() if c.hash() == h]
            if args.dry_run:
                dirs[h] = str(Path("runs") / "pretrain" / h)
                print(f"pretrain: seed {cfg.train.seed}, {args.pretrain_steps} steps without memory -> {dirs[h]}")
            elif all(is_done(out / "runs" / r) for r in dependents):
                dirs[h] = str(Path("runs") / "pretrain" / h)
                print(f"pretrain: seed {cfg.train.seed} not needed ({len(dependents)} runs from it are finished)",
                      file=sys.stderr, flush=True)
            else:
                to_train[h] = cfg
        dirs.update(train_pretrains(to_train, args.jobs if args.executor == "local" else 1, run_fn))
        for h, cfg in distinct.items():
            est = estimate_cost(cfg.to_dict(), resolved.preset.est_flops_per_s)
            pretrains[dirs[h]] = {"seed": cfg.train.seed, "steps": cfg.train.steps, "tokens": est["tokens"],
                                  "qk_norm": cfg.model.qk_norm}
        resolved = with_init_from(resolved, {h: dirs[cfg.hash()] for h, cfg in starts.items()})
    if args.dry_run:
        print(dry_run_text(resolved, out))
        return 0
    devices = {str(spec.config["train"]["device"]) for spec in resolved.runs.values()}
    if args.executor == "ray":
        executor: Executor = RayExecutor(args.cpus_per_run, run_fn, args.gpus_per_run, devices)
    else:
        gpus = visible_gpus() if any(uses_cuda(d) for d in devices) else []
        executor = LocalExecutor(args.jobs, run_fn, gpus)
        if gpus:
            print(f"memtrans ablate: {len(gpus)} GPU(s) ({', '.join(gpus)}): each run on CUDA is pinned to one "
                  f"(CUDA_VISIBLE_DEVICES), the least busy when it starts; --jobs {args.jobs}", flush=True)
    meta = {"command": shlex.join(["memtrans", "ablate", *(sys.argv[2:] if argv is None else argv)]),
            "cwd": os.getcwd(), "executor": args.executor, "jobs": args.jobs,
            "budget_minutes": args.budget_minutes, "budget_tokens": args.budget_tokens,
            "init_from": resolved.extra_overrides.get("train.init_from"), "only": args.only,
            "pretrain_steps": args.pretrain_steps, "pretrains": pretrains or None,
            "gpus": executor.gpus.gpus if isinstance(executor, LocalExecutor) and executor.gpus else None,
            "gpus_per_run": getattr(executor, "gpus_per_run", None)}
    statuses = execute(resolved, out, executor, meta, progress=not args.no_progress)
    failed = sorted(h for h, s in statuses.items() if s == "failed")
    if not args.no_report:
        from memtrans.ablation.report import write_report

        path = write_report(out)
        print(f"report: {path}")
    if failed:
        print(f"{len(failed)} run(s) failed (see {out}/runs/<hash>/error.txt): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
