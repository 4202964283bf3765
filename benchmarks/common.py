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
            f"torch {torch.__version__} threads {torch.get_num_threads()} | faiss {fv} | loadavg {load}\n"
            f"# {policy_line()}")


def policy_line() -> str:
    """The precision policy and retrieval kernel this process uses (memtrans.device, fast_topk)."""
    from memtrans.config import load_config
    from memtrans.device import policy_of
    from memtrans.memory import fast_topk
    return f"default policy: {policy_of(load_config(None)).describe()} | retrieval kernel {fast_topk.isa() or 'none (reference)'}"


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


def trained_keys(run_dir: str, n: int, split: str = "train", layer: int | None = None, batch: int = 4):
    """Keys and queries of a trained run's memory layer, as the memory sees them (qk-normalised if the run
    normalises): (keys [H, n, D], queries [H, n, D]) fp32, in stream order (segment by segment, slot by slot),
    from streaming the run's own corpus split through its checkpoint until n tokens were seen. Documents are
    concatenated: this measures retrieval on a trained key distribution, not within-document recall."""
    from pathlib import Path

    from memtrans.data import DocumentStream, prepare_data
    from memtrans.eval.evaluate import _load_run  # the evaluator's checks: run dir, config, checkpoint match
    from memtrans.model import MemorizingTransformer

    try:
        cfg, ckpt = _load_run(Path(run_dir), None)
    except ValueError as e:
        raise SystemExit(f"--run {run_dir}: {e}") from None
    if not cfg.model.memory_layers:
        raise SystemExit(f"--run {run_dir}: the run has no memory layer (model.memory_layers is empty)")
    layer = cfg.model.memory_layers[0] if layer is None else layer
    model = MemorizingTransformer(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    docs = prepare_data(cfg.data, cfg.train.seed).splits[split]
    stream = DocumentStream(docs, batch, cfg.model.segment_len, seed=0, loop=False, shuffle=False)  # no repeats
    state = model.init_state(batch)
    mem = state.memories[layer]
    keys, queries = [], []
    search, add = mem.search, mem.add

    def rec_search(q, k):
        queries.append(q.detach().float().transpose(0, 1).reshape(q.shape[1], -1, q.shape[-1]))  # [H, B*T, D]
        return search(q, k)

    def rec_add(k, v, positions=None):
        keys.append(k.detach().float().transpose(0, 1).reshape(k.shape[1], -1, k.shape[-1]))
        return add(k, v, positions)

    mem.search, mem.add = rec_search, rec_add
    seen = 0
    with torch.no_grad():
        for b in stream:
            model.reset_state(state, b.new_doc)
            model(b.tokens, state)
            seen += b.tokens.numel()
            if seen >= n:
                break
    k, q = torch.cat(keys, 1)[:, :n], torch.cat(queries, 1)[:, :n]
    if k.shape[1] < n:
        raise SystemExit(f"--run {run_dir}: the {split} split has only {k.shape[1]} tokens; need {n}")
    return k, q
