"""Training-step throughput with and without a kNN memory layer (forward + backward + AdamW step).

Variants (interleaved in one process, one model per memory size, same seed): no memory, and one memory
layer (layer depth-2) whose memory is pre-filled to capacity with random unit keys, so every step pays
the full-memory retrieval cost; each in fp32 and in bf16 autocast. The memory's ring stays bf16 and
the exact engine uses `--score-dtype` (default bf16 scores, the ModelConfig default) on the path
`--paths` names (fast = fused kernel, reference = torch matmul + topk).

Model FLOPs per step (the MFU numerator; retrieval search FLOPs are NOT counted, they are shown apart):
    6 * P * tokens                                  P = parameters excluding the embedding table
  + 3 * depth * 4 * B * T * L * H * Dh              local attention QK^T and PV, L = T + XL keys
  + 3 * memory_layers * 4 * B * T * k * H * Dh      attention over the k retrieved entries
  retrieval (not in MFU): 2 * B * T * N * H * Dh per memory layer
MFU = model FLOPs / step time / measured torch.matmul peak (2048^3, same dtype as the step, same threads).

    python benchmarks/train_step.py --quick
    python benchmarks/train_step.py --threads 2 --sizes 65K,262K
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, loadavg, matmul_peak  # noqa: E402

from memtrans import ModelConfig  # noqa: E402
from memtrans.memory import ExactMemory  # noqa: E402
from memtrans.model.transformer import MemorizingTransformer  # noqa: E402


def parse_size(s: str) -> int:
    s = s.strip().upper()
    n = int(float(s.rstrip("K")) * 1024) if s.endswith("K") else int(s)
    return {65 * 1024: 65536, 131 * 1024: 131072, 262 * 1024: 262144}.get(n, n)


class Variant:
    def __init__(self, a, memory_size: int | None, precision: str, path: str):
        self.memory_size, self.precision, self.path = memory_size, precision, path
        torch.manual_seed(0)
        self.cfg = ModelConfig(dim=a.dim, depth=a.depth, heads=a.heads, head_dim=a.head_dim, segment_len=a.segment,
                               memory_layers=(a.depth - 2,) if memory_size else (), memory_size=memory_size or 1024,
                               score_dtype=a.score_dtype, knn_k=a.k)
        self.model = MemorizingTransformer(self.cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.state = self.model.init_state(a.batch)
        g = torch.Generator().manual_seed(1)
        for mem in self.state.memories.values():
            if isinstance(mem, ExactMemory):
                mem.fast = path == "fast"
            B, H, D = a.batch, a.heads, a.head_dim
            for s in range(0, memory_size, 16384):  # fill to capacity in chunks (bounded temporaries)
                n = min(16384, memory_size - s)
                x = F.normalize(torch.randn(B, H, n, D, generator=g), dim=-1)
                mem.add(x, x, torch.arange(s, s + n).expand(B, n))
        self.tokens = torch.randint(0, self.cfg.vocab_size, (a.batch, a.segment + 1), generator=g)
        self.times: list[float] = []

    @property
    def name(self) -> str:
        mem = f"mem {self.memory_size // 1024}K {self.path}" if self.memory_size else "no memory"
        return f"{mem}, {self.precision}"

    def step(self) -> float:
        x, y = self.tokens[:, :-1], self.tokens[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, self.state = self.model(x, self.state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def flops(self, a) -> tuple[float, float]:
        P = sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith("embed"))
        B, T, H, Dh = a.batch, a.segment, a.heads, a.head_dim
        L = 2 * T  # segment + XL cache
        model = 6 * P * B * T + 3 * a.depth * 4 * B * T * L * H * Dh
        retrieval = 0.0
        if self.memory_size:
            model += 3 * 4 * B * T * a.k * H * Dh
            retrieval = 2 * B * T * self.memory_size * H * Dh
        return model, retrieval


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--segment", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sizes", default="65K,262K", help="memory sizes (entries per slot and head)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--paths", default="fast", help="exact-engine paths for memory variants: fast,reference")
    p.add_argument("--score-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="dim 256, depth 4, head_dim 32, segment 256, B=2, 8K/32K")
    a = p.parse_args(argv)
    if a.quick:
        a.dim, a.depth, a.head_dim, a.segment, a.batch, a.reps = 256, 4, 32, 256, 2, 3
        if a.sizes == "65K,262K":
            a.sizes = "8K,32K"
    torch.set_num_threads(a.threads)
    print(header("training step: forward + backward + AdamW, one memory layer pre-filled to capacity"))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"# model dim {a.dim} depth {a.depth} heads {a.heads} head_dim {a.head_dim} segment {a.segment} B {a.batch} "
          f"k {a.k}; memory layer {a.depth - 2}; ring bf16, scores {a.score_dtype}")
    print(f"# measured matmul peak (2048^3, {a.threads} threads): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    sizes = [parse_size(s) for s in a.sizes.split(",") if s]
    precisions = a.precisions.split(",")
    variants = [Variant(a, None, pr, "fast") for pr in precisions]
    variants += [Variant(a, n, pr, path) for n in sizes for path in a.paths.split(",") for pr in precisions]
    for _ in range(2):  # warm-up (also fills the XL cache; the first steps allocate optimizer state)
        for v in variants:
            v.step()
    for _ in range(a.reps):  # interleaved: every variant sees the same machine state
        for v in variants:
            v.times.append(v.step())
    tokens = a.batch * a.segment
    base = {pr: sorted(v.times)[len(v.times) // 2] for v in variants if not v.memory_size for pr in [v.precision]}
    cols = f"{'variant':<28} {'ms/step':>9} {'tokens/s':>9} {'x no-mem':>8} {'model GF':>9} {'MFU':>6} {'retr. GF':>9}"
    print(cols)
    print("-" * len(cols))
    for v in variants:
        t = sorted(v.times)[len(v.times) // 2]
        model_f, retr_f = v.flops(a)
        print(f"{v.name:<28} {t * 1e3:>9.0f} {tokens / t:>9.0f} {t / base[v.precision]:>8.2f} {model_f / 1e9:>9.1f} "
              f"{model_f / t / peaks[v.precision]:>6.1%} {retr_f / 1e9:>9.1f}")
    print(f"# x no-mem = step time / no-memory step time (same precision); median of {a.reps} after 2 warm-ups; "
          f"loadavg at end {loadavg()}")


if __name__ == "__main__":
    main()
