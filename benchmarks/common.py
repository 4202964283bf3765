"""Shared helpers for the benchmark scripts: environment header, timing, synthetic keys."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(title: str) -> str:
    try:
        import faiss
        fv = faiss.__version__
    except ImportError:
        fv = "not installed"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"# {title}\n# date {datetime.datetime.now().isoformat(timespec='seconds')} | CPU {cpu_model()} "
            f"({os.cpu_count()} logical cores, capability {torch.backends.cpu.get_cpu_capability()}) | "
            f"torch {torch.__version__} threads {torch.get_num_threads()} | faiss {fv} | loadavg {load}")


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timeit(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `reps` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def clustered_unit(n: int, d: int, centres: torch.Tensor, g: torch.Generator, noise: float = 0.6) -> torch.Tensor:
    """n L2-normalised vectors around random unit cluster centres (closer to real attention keys than iid).

    noise is the expected norm of the perturbation added to a unit centre before normalising (0.6: a
    point's cosine to its centre is ~0.85)."""
    c = torch.nn.functional.normalize(centres, dim=-1)
    x = c[torch.randint(0, len(c), (n,), generator=g)] + noise * torch.randn(n, d, generator=g) / d ** 0.5
    return torch.nn.functional.normalize(x, dim=-1)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` n x n x n torch.matmul in `dtype` (after one warm-up) on the current
    threads: the best run, since background load only ever slows a run down."""
    x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x @ y
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
