"""Training and evaluation throughput (tokens/s) of a small model with and without kNN memory.

    python benchmarks/eval_speed.py [--dim 128] [--depth 4] [--segment 128] [--batch 4] [--steps 20]
                                    [--rounds 3] [--memory-size 4096] [--threads N] [--device cpu]

Variants run interleaved in one process (round-robin over `--rounds`), so background load affects them
alike; the table reports the median over rounds, plus torch threads and the load average before/after.
Training = forward + backward + AdamW step on one segment per step (state carried, as in memtrans train);
evaluation = forward under no_grad with memory accumulating. Tokens are random bytes (speed only).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from memtrans.config import ModelConfig
from memtrans.model import MemorizingTransformer
from memtrans.train.trainer import masked_loss


def make(mem: bool, a) -> MemorizingTransformer:
    cfg = ModelConfig(vocab_size=256, dim=a.dim, depth=a.depth, heads=a.dim // 32, head_dim=32,
                      segment_len=a.segment, memory_layers="near_top" if mem else (), memory_size=a.memory_size,
                      knn_k=32)
    return MemorizingTransformer(cfg).to(a.device)


def run_train(model, a) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = model.init_state(a.batch)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (a.steps, a.batch, a.segment + 1), generator=g).to(a.device)
    mask = torch.ones(a.batch, a.segment, dtype=torch.bool, device=a.device)
    t = time.perf_counter()
    for i in range(a.steps):
        logits, state = model(tokens[i, :, :-1], state)
        loss, _ = masked_loss(logits, tokens[i, :, 1:], mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return a.steps * a.batch * a.segment / (time.perf_counter() - t)


@torch.no_grad()
def run_eval(model, a) -> float:
    state = model.init_state(a.batch)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (a.steps, a.batch, a.segment), generator=g).to(a.device)
    t = time.perf_counter()
    for i in range(a.steps):
        _, state = model(tokens[i], state)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return a.steps * a.batch * a.segment / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    torch.manual_seed(0)
    models = {"memory": make(True, a), "no memory": make(False, a)}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for name, model in models.items():
            results.setdefault((name, "train"), []).append(run_train(model, a))
            results.setdefault((name, "eval"), []).append(run_eval(model, a))
    load1 = os.getloadavg()
    print(f"dim {a.dim}, depth {a.depth}, segment {a.segment}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, "
          f"memory_size {a.memory_size}, device {a.device}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"{'model':<12}{'params':>10}{'train tok/s':>14}{'eval tok/s':>14}")
    for name, model in models.items():
        tr = statistics.median(results[(name, "train")])
        ev = statistics.median(results[(name, "eval")])
        print(f"{name:<12}{model.num_params():>10}{tr:>14.0f}{ev:>14.0f}")


if __name__ == "__main__":
    main()
