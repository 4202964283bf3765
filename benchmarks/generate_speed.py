"""Decoding speed (tokens/s) with and without a filled kNN memory, and the memory's cost per token against
reading its keys once.

    python benchmarks/generate_speed.py [--quick] [--tokens 32] [--rounds 3] [--threads 1]
                                        [--memory-size 65536] [--memory-dtype float32] [--score-dtype float32]

Model: the benchmarks' shape (dim 512, depth 8, 8 heads x 64, segment 512, memory at `near_top` = layer 5,
k = 32, qk-norm), random weights; `--quick`: dim 64, depth 2, 2 x 32 heads, segment 64, 4,096 entries.
Setup per variant: the memory is filled with `--memory-size` clustered unit keys per head (written through
`memory.add`, as a document of that many tokens would leave it; streaming 65K tokens through the model first
would take minutes and measure prefill, not decoding), the XL caches hold a full previous segment, and the
state stands at the start of a segment. Then `--tokens` tokens are decoded greedily with `model.generate` (one
`extend` per token: local attention over XL cache + the segment so far, one retrieval per memory layer).
The two variants (memory / the same model with `memory_layers=()`) run interleaved for `--rounds` rounds; the
table gives the median. The memory's cost per token = (ms/token with memory) - (ms/token without); it is
compared with (bytes of the stored keys) / (read bandwidth), the bandwidth measured in this run as the best
of 5 `torch.sum` over a 512 MiB fp32 buffer on the same threads (background load only slows a run, so the
best is the closest to the machine's bandwidth), and with the bytes the search path actually streams (with
the int8 prefilter of the AVX-512 VNNI kernel: D int8 codes + 16 B per entry and head, not the keys). One
`memory.search` of one query against the filled memory is timed on its own too (median and best of 15).
`MEMTRANS_EXACT_PREFILTER=none` measures the plain kernel.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clustered_unit, header, loadavg  # noqa: E402

from memtrans.config import ModelConfig  # noqa: E402
from memtrans.model import MemorizingTransformer  # noqa: E402


def shape(a) -> dict:
    if a.quick:
        return dict(dim=64, depth=2, heads=2, head_dim=32, segment_len=64)
    return dict(dim=512, depth=8, heads=8, head_dim=64, segment_len=512)


def build(a, memory: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, memory_layers="near_top" if memory else (), memory_size=a.memory_size,
                      knn_k=32, memory_dtype=a.memory_dtype, score_dtype=a.score_dtype, **shape(a))
    return MemorizingTransformer(cfg).eval()


@torch.no_grad()
def filled_state(model, a):
    """State at the start of a segment, after a document of memory_size tokens (memory full, XL cache full)."""
    cfg = model.cfg
    H, D, S = cfg.heads, cfg.head_dim, cfg.segment_len
    g = torch.Generator().manual_seed(1)
    state = model.init_state(1)
    n = a.memory_size
    for mem in state.memories.values():
        centres = torch.randn(64, D, generator=g)
        for s in range(0, n, 4096):
            m = min(4096, n - s)
            k = torch.stack([clustered_unit(m, D, centres, g) for _ in range(H)])[None]  # [1, H, m, D]
            v = torch.randn(1, H, m, D, generator=g)
            mem.add(k, v, torch.arange(s, s + m)[None])
    state.xl = [(torch.nn.functional.normalize(torch.randn(1, H, S, D, generator=g), dim=-1),
                 torch.randn(1, H, S, D, generator=g)) for _ in range(cfg.depth)]
    state.xl_valid = torch.ones(1, S, dtype=torch.bool)
    state.positions = torch.tensor([n])
    return state


def decode_ms_per_token(model, state, a) -> tuple[float, float]:
    """(wall, CPU) ms per decoded token; the state is cloned so every round decodes from the same point.
    CPU time (process_time, one torch thread) is what the decoding cost this process: on a machine loaded by
    other jobs the wall time also holds the time spent waiting for a core."""
    st = model.load_state(state.state_dict())
    prompt = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(2))
    t, c = time.perf_counter(), time.process_time()
    new, _ = model.generate(prompt, st, a.tokens, temperature=0)
    el, cpu = time.perf_counter() - t, time.process_time() - c
    return 1e3 * el / (a.tokens + 1), 1e3 * cpu / (a.tokens + 1)  # prompt token + each generated one: one extend each


def read_bandwidth(mib: int = 512) -> float:
    buf = torch.ones(mib * 2 ** 20 // 4)
    buf.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


@torch.no_grad()
def search_ms(model, state) -> float:
    layer = model.cfg.memory_layers[0]
    mem = state.memories[layer]
    q = torch.nn.functional.normalize(torch.randn(1, model.cfg.heads, 1, model.cfg.head_dim), dim=-1)
    mem.search(q, model.cfg.knn_k)
    ts, cs = [], []
    for _ in range(15):
        t, c = time.perf_counter(), time.process_time()
        mem.search(q, model.cfg.knn_k)
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return 1e3 * min(ts), 1e3 * statistics.median(ts), 1e3 * statistics.median(cs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens decoded per round (default 32, quick 16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-size", type=int, default=None, help="entries per head (default 65536, quick 4096)")
    ap.add_argument("--memory-dtype", default="float32")
    ap.add_argument("--score-dtype", default="float32")
    a = ap.parse_args()
    a.tokens = a.tokens or (16 if a.quick else 32)
    a.memory_size = a.memory_size or (4096 if a.quick else 65536)
    torch.set_num_threads(a.threads)
    print(header("generate_speed: decoding tokens/s with and without memory"))
    sh = shape(a)
    print(f"# model dim {sh['dim']} depth {sh['depth']} heads {sh['heads']}x{sh['head_dim']} segment "
          f"{sh['segment_len']}, memory {a.memory_size:,} entries/head at near_top, k=32, memory {a.memory_dtype}, "
          f"scores {a.score_dtype}; {a.tokens} tokens x {a.rounds} rounds, batch 1")
    models = {"memory": build(a, True), "no memory": build(a, False)}
    t = time.perf_counter()
    states = {name: filled_state(m, a) for name, m in models.items()}
    mem_layer = models["memory"].cfg.memory_layers[0]
    mem = states["memory"].memories[mem_layer]
    from memtrans.memory.exact import ExactMemory
    path = mem.active_path() if isinstance(mem, ExactMemory) else mem.name
    print(f"# memory filled in {time.perf_counter() - t:.1f} s; retrieval path: {path}; loadavg before {loadavg()}")
    times = {name: [] for name in models}
    cpus = {name: [] for name in models}
    for _ in range(a.rounds):
        for name, m in models.items():
            wall, cpu = decode_ms_per_token(m, states[name], a)
            times[name].append(wall)
            cpus[name].append(cpu)
    bw = read_bandwidth()
    s_min, s_ms, s_cpu = search_ms(models["memory"], states["memory"])
    key_bytes = mem.keys[:, :, :a.memory_size].numel() * mem.keys.element_size()
    read_ms = 1e3 * key_bytes / bw
    # What the search streams: with the int8 prefilter, per (entry, head) D int8 codes + 16 B (corr, scale,
    # err, norm) for the heads that keep it, the keys for heads that fell back (crowded scores); the exact
    # rescoring of the prefilter's survivors comes on top (a small share when the bound separates).
    H, D, N = sh["heads"], sh["head_dim"], a.memory_size
    if path == "fused-int8":
        on = int(mem._int8_ok[0].sum())
        stream_bytes = N * (on * (D + 16) + (H - on) * D * mem.keys.element_size())
        stream_note = f"int8 prefilter kept by {on}/{H} heads"
    else:
        stream_bytes, stream_note = key_bytes, "no prefilter: the keys themselves"
    stream_ms = 1e3 * stream_bytes / bw
    med = {name: statistics.median(v) for name, v in times.items()}
    cmed = {name: statistics.median(v) for name, v in cpus.items()}
    print(f"\n| variant | wall ms/token (median; rounds) | tokens/s | CPU ms/token (median; rounds) | tokens/s of CPU |"
          f"\n|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {med[name]:.1f} ({', '.join(f'{x:.1f}' for x in times[name])}) | {1e3 / med[name]:.1f} | "
              f"{cmed[name]:.1f} ({', '.join(f'{x:.1f}' for x in cpus[name])}) | {1e3 / cmed[name]:.1f} |")
    cost = med["memory"] - med["no memory"]
    ccost = cmed["memory"] - cmed["no memory"]
    print(f"\nmemory cost per token: {cost:.1f} ms wall, {ccost:.1f} ms CPU (with - without, medians); one search of "
          f"one query alone: {s_ms:.1f} ms median, {s_min:.1f} ms best of 15 (wall), {s_cpu:.1f} ms CPU median")
    print(f"keys stored: {key_bytes / 2 ** 20:.0f} MiB ({a.memory_size:,} x {sh['heads']} heads x {sh['head_dim']} x "
          f"{mem.keys.element_size()} B); read bandwidth {bw / 1e9:.1f} GB/s -> reading them once: {read_ms:.1f} ms")
    print(f"memory cost / one read of the keys: {cost / read_ms:.2f}x wall, {ccost / read_ms:.2f}x CPU (search alone: "
          f"{s_ms / read_ms:.2f}x median, {s_min / read_ms:.2f}x best, {s_cpu / read_ms:.2f}x CPU)")
    print(f"bytes the search streams ({path}; {stream_note}): {stream_bytes / 2 ** 20:.0f} MiB -> {stream_ms:.1f} ms; "
          f"memory cost / that: {cost / stream_ms:.2f}x wall, {ccost / stream_ms:.2f}x CPU (search alone: "
          f"{s_ms / stream_ms:.2f}x median, {s_min / stream_ms:.2f}x best, {s_cpu / stream_ms:.2f}x CPU)")
    print(f"# loadavg after {loadavg()}")


if __name__ == "__main__":
    main()
