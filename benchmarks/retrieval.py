"""Cost of one kNN-memory layer per segment: retrieve (top-k search) + write (add), per backend and size.

For each memory size N and batch B this fills a memory of B slots x 8 heads x N entries (head_dim 64,
bf16 ring, the policy's memory dtype on bf16 CPUs; the kernels widen it to fp32 on the others, so it halves the bytes read everywhere) with clustered, L2-normalised keys, then times one segment:
`search(512 queries, k=32)` + `add(512 entries)`, interleaved with the segment's dense local causal
attention (F.scaled_dot_product_attention, 512 queries x 1024 keys = segment + XL cache of 512, fp32).
Recall@32 is measured against the fp32 exact *reference* path (plain matmul + torch.topk) on the
freshly filled memory, over the first --recall-queries queries of every slot and head.

Backends: exact_fp32 / exact_bf16 (ExactMemory, fastest correct path, fp32 / bf16 scores: the fused kernel
with its int8 prefilter where the CPU has AVX-512 VNNI), exact_fp32_fused / exact_bf16_fused (the fused
kernel without the prefilter), exact_fp32_ref / exact_bf16_ref (ExactMemory forced onto the reference torch
path), faiss_flat, faiss_ivf.

With `--keys trained --run RUN_DIR` the keys and queries come from a trained run instead: its memory layer's
(qk-normalised) keys and queries while its checkpoint streams its own corpus (documents concatenated; heads and
head_dim are the run's). Slot b's ring holds one stretch of N keys and its 512 queries are the next tokens'.

    python benchmarks/retrieval.py --quick
    python benchmarks/retrieval.py --sizes 8K,32K,65K,131K,262K --batch 1,4 --threads 1
    python benchmarks/retrieval.py --keys trained --run results/<study>/<corpus>/runs/<id> --sizes 65K,262K
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import clustered_unit, header, loadavg, timeit, trained_keys  # noqa: E402

from memtrans.memory import ExactMemory, fast_topk  # noqa: E402

HEADS, HEAD_DIM, T, K, XL = 8, 64, 512, 32, 512
ALL_BACKENDS = ["exact_fp32_ref", "exact_bf16_ref", "exact_fp32_fused", "exact_bf16_fused", "exact_fp32", "exact_bf16",
                "faiss_flat", "faiss_ivf"]
# rough single-thread ns per (query, entry, head) score, only used to skip absurdly long runs
EST_NS = {"exact_fp32_ref": 20.0, "exact_bf16_ref": 8.0, "exact_fp32_fused": 1.0, "exact_bf16_fused": 0.6,
          "exact_fp32": 0.6, "exact_bf16": 0.6,
          "faiss_flat": 30.0, "faiss_ivf": 0.2}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    n = int(float(s.rstrip("KM")) * mult)
    return {8 * 1024: 8192, 32 * 1024: 32768, 65 * 1024: 65536, 131 * 1024: 131072, 262 * 1024: 262144}.get(n, n)


def make(backend: str, B: int, N: int, nlist: int, nprobe: int, H: int = HEADS, D: int = HEAD_DIM):
    kw = dict(dtype=torch.bfloat16)
    if backend.startswith("exact"):
        score = torch.float32 if "fp32" in backend else torch.bfloat16
        prefilter = "none" if backend.endswith("_fused") else None  # None: the class default (int8)
        return ExactMemory(B, H, D, N, score_dtype=score, fast=not backend.endswith("_ref"),
                           prefilter=prefilter, **kw)
    from memtrans.memory.faiss_engines import FaissFlatMemory, FaissIVFMemory
    if backend == "faiss_flat":
        return FaissFlatMemory(B, H, D, N, **kw)
    if backend == "faiss_ivf":
        return FaissIVFMemory(B, H, D, N, nlist=nlist, nprobe=nprobe, **kw)
    raise ValueError(backend)


def recall(res, ref) -> float:
    a, va = res.indices.reshape(-1, K), res.valid.reshape(-1, K)
    b, vb = ref.indices.reshape(-1, K), ref.valid.reshape(-1, K)
    hit = tot = 0
    for x, u, y, w in zip(a.tolist(), va.tolist(), b.tolist(), vb.tolist()):
        ys = {i for i, ok in zip(y, w) if ok}
        hit += len({i for i, ok in zip(x, u) if ok} & ys)
        tot += len(ys)
    return hit / max(1, tot)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="8K,32K,65K,131K,262K")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (document slots), e.g. 1,4")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS))
    p.add_argument("--isas", default=None, help="kernel ISA levels to compare for the exact fused backends, e.g. "
                   "avx2,portable (default: the active one; each runs interleaved in this process)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keys", default="clustered", choices=["clustered", "random", "trained"])
    p.add_argument("--run", help="with --keys trained: a training run directory (config.yaml + checkpoint)")
    p.add_argument("--split", default="train", help="with --keys trained: the corpus split streamed")
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--recall-queries", type=int, default=64)
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=20.0, help="skip combinations estimated slower than this")
    p.add_argument("--all", action="store_true", help="run every combination, however slow")
    p.add_argument("--quick", action="store_true", help="8K and 32K, B=1, 2 reps")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.batch, a.reps = "8K,32K", "1", 2
    torch.set_num_threads(a.threads)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batch.split(",")]
    backends = [b.strip() for b in a.backends.split(",")]
    isas = a.isas.split(",") if a.isas else [fast_topk.isa()]
    for b in backends:
        if b not in ALL_BACKENDS:
            p.error(f"unknown backend {b}; choose from {ALL_BACKENDS}")
    H, D, real = HEADS, HEAD_DIM, None
    if a.keys == "trained":
        if not a.run:
            p.error("--keys trained needs --run RUN_DIR")
        need = max(batches) * (max(sizes) + 2 * T)
        real = trained_keys(a.run, need, a.split)  # (keys, queries) [H, need, D]
        H, D = real[0].shape[0], real[0].shape[2]
    print(header(f"kNN memory: one layer, one segment (search k=32 + add 512), {H} heads x dim {D}, bf16 ring"))
    if real is not None:
        print(f"# keys: trained, from {a.run} ({a.split} split, {need} tokens streamed); queries: the next tokens' own")
    else:
        print(f"# keys: {a.keys} L2-normalised{f' ({a.clusters} clusters per head)' if a.keys == 'clustered' else ''}; "
              f"queries drawn the same way")
    print(f"# attention = SDPA fp32 {T}q x {T + XL}k causal; faiss_ivf nlist {a.nlist} nprobe {a.nprobe}; "
          f"median of {a.reps} after 1 warm-up")
    from common import matmul_peak
    peak = matmul_peak(torch.float32)
    print(f"# fp32 matmul peak (2048^3, this process) {peak / 1e9:.1f} GFLOP/s; 'x flops' = ms/seg / (search FLOPs / peak)")
    cols = (f"{'N':>7} {'B':>2} {'backend':<15} {'ms/seg':>9} {'attn ms':>8} {'x attn':>7} {'recall@32':>9} {'MiB':>7} "
            f"{'x flops':>8}  note")
    print(cols)
    print("-" * len(cols))
    for N in sizes:
        for B in batches:
            g = torch.Generator().manual_seed(N + B)
            centres = torch.randn(H, a.clusters, D, generator=g)

            def draw(n):  # [B, H, n, D]
                if a.keys == "random":
                    return F.normalize(torch.randn(B, H, n, D, generator=g), dim=-1)
                return torch.stack([torch.stack([clustered_unit(n, D, centres[h], g) for h in range(H)])
                                    for _ in range(B)])

            if real is not None:  # slot b: keys of one stretch, then its next tokens' queries and keys
                stretch = N + 2 * T
                part = lambda t, lo, hi: torch.stack([t[:, b * stretch + lo:b * stretch + hi] for b in range(B)])  # noqa: E731
                fill, q, seg_k = part(real[0], 0, N).to(torch.bfloat16), part(real[1], N, N + T), part(real[0], N, N + T)
            else:
                chunk = 8192
                fill = torch.cat([draw(min(chunk, N - s)).to(torch.bfloat16) for s in range(0, N, chunk)], 2)
                q = draw(T)
                seg_k = draw(T)
            pos = torch.arange(N, N + T).expand(B, T)
            kx, vx = torch.randn(B, H, T + XL, D), torch.randn(B, H, T + XL, D)
            mask = torch.ones(T, T + XL, dtype=torch.bool).tril(XL)
            attn = lambda: F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)  # noqa: E731
            ref_mem = make("exact_fp32_ref", B, N, a.nlist, a.nprobe, H, D)
            ref_mem.add(fill, fill, torch.arange(N).expand(B, N))
            nq = min(a.recall_queries, T)
            ref = ref_mem.search(q[:, :, :nq].contiguous(), K)
            del ref_mem
            runs = [(b, i) for b in backends for i in (isas if b.startswith("exact") and not b.endswith("_ref") else [None])]
            for backend, isa in runs:
                if isa is not None:
                    fast_topk.use_isa(isa)
                est = EST_NS[backend] * 1e-9 * B * H * T * N * D / HEAD_DIM
                if est > a.max_seconds and not a.all:
                    print(f"{N:>7} {B:>2} {backend:<15} {'skipped':>9} {'':>8} {'':>7} {'':>9} {'':>7}  "
                          f"estimated ~{est:.0f} s per segment (> --max-seconds {a.max_seconds:g}; --all runs it)")
                    continue
                mem = make(backend, B, N, a.nlist, a.nprobe, H, D)
                mem.add(fill, fill, torch.arange(N).expand(B, N))
                t0 = __import__("time").perf_counter()
                r = recall(mem.search(q[:, :, :nq].contiguous(), K), ref)  # first search also trains IVF indexes
                first = __import__("time").perf_counter() - t0
                note = f"first search (IVF training) {first:.1f} s" if backend == "faiss_ivf" else ""
                if backend.startswith("exact") and not backend.endswith("_ref"):
                    note = f"path: {mem.active_path(q)}" + (f" ({fast_topk.isa()})" if fast_topk.isa() else "")
                    before = dict(fast_topk.stats)
                mib = mem.nbytes / 2 ** 20
                ta, tm = [], []

                def segment():
                    mem.search(q, K)
                    mem.add(seg_k, seg_k, pos)

                reps = 1 if est > 5 else a.reps
                attn(), segment()  # warm-up
                for _ in range(reps):  # interleaved: attention and memory share the same machine state
                    ta.append(timeit(attn, reps=1, warmup=0))
                    tm.append(timeit(segment, reps=1, warmup=0))
                ta_ms, tm_ms = sorted(ta)[len(ta) // 2] * 1e3, sorted(tm)[len(tm) // 2] * 1e3
                if "fused-int8" in note:  # how often a crowded band sent a (slot, head) to the plain kernel
                    searched = fast_topk.stats["int8_queries"] - before["int8_queries"]
                    fell_back = fast_topk.stats["int8_fallback_queries"] - before["int8_fallback_queries"]
                    note += f" (plain-kernel fallback for {100 * fell_back / max(1, searched):.0f}% of queries)"
                ideal = 2 * B * H * T * N * D / peak * 1e3  # the search's FLOPs at the fp32 matmul peak
                print(f"{N:>7} {B:>2} {backend:<15} {tm_ms:>9.1f} {ta_ms:>8.1f} {tm_ms / ta_ms:>7.1f} {r:>9.4f} "
                      f"{mib:>7.0f} {tm_ms / ideal:>8.2f}  {note}", flush=True)
                del mem
                gc.collect()
            del fill
            gc.collect()
    print(f"# loadavg at end {loadavg()}")


if __name__ == "__main__":
    main()
