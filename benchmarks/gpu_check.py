"""The prepared device check (issue 13): one table of what a GPU run needs, measured on this machine.

    bash benchmarks/gpu_check.sh            # on a GPU: the full check (<= 8 minutes on one modern GPU)
    bash benchmarks/gpu_check.sh --tiny     # tiny shapes (automatic without CUDA): keeps the script working in CI

Rows:
- tests: tests/test_gpu_ready.py, tests/test_memory.py and tests/test_model.py with MEMTRANS_TEST_DEVICE set
  to the device (their device-parametrised tests run there; the rest run on CPU as usual).
- retrieval: ExactMemory's reference search (the CUDA path), B=8 slots x 8 heads x 512 queries x d 128, k 32,
  over a full ring of 65K / 262K / 1M random unit keys (bf16 ring, as `auto` stores on a bf16 GPU): fp32
  queries with IEEE fp32 products (what qk-norm queries get; the recall reference), the same with TF32
  (`ExactMemory.cuda_fp32_precision = "tf32"`) and bf16 queries (bf16 autocast without qk-norm: bf16
  products summed in fp32). ms = median search; recall@32 against the IEEE fp32 search; "x peak" = time /
  (search FLOPs 2*B*H*T*N*D at the bf16 matmul peak measured here).
- train step: forward + backward + AdamW at the paper's shape (12 layers, d 1024, 8 x 128 heads, FFN 4096,
  vocabulary 32K, segment 512 with XL cache, bf16 autocast, batch --batch), without memory and with one full
  memory layer at layer 9 (65K, 262K entries, k 32, exact engine; the policy's dtypes, and float32 scores).
  MFU = model FLOPs
  (benchmarks/train_step.py's count; retrieval not counted) / time / the measured bf16 matmul peak.
- ablate: `memtrans ablate --preset ci --only "Memory Ablation"` on the device, 6 steps per run (2 runs).

Targets (one modern GPU): a 65K memory layer adds <= 15% to the paper-shape step, <= 35% at 262K; exact
retrieval at 65K, B=8 within 3x of its FLOPs at the bf16 peak. Tiny shapes print the same rows, no verdicts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(batch=8, heads=8, head_dim=128, queries=512, k=32, sizes=(65536, 262144, 1 << 20),
            dim=1024, depth=12, segment=512, vocab=32768, mem_layer=9, train_sizes=(65536, 262144), train_batch=8,
            steps=6, warmup=2, reps=5)
TINY = dict(batch=2, heads=2, head_dim=32, queries=32, k=8, sizes=(1024, 4096, 16384),
            dim=64, depth=4, segment=32, vocab=256, mem_layer=2, train_sizes=(1024, 4096), train_batch=2,
            steps=4, warmup=2, reps=2)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps):
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bf16_peak(device, n):
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n ** 3 / min(timed(lambda: x @ y, device, 3) for _ in range(3))


# ---- tests ---------------------------------------------------------------------------------------------------
def run_tests(device):
    env = dict(os.environ, MEMTRANS_TEST_DEVICE=device.type, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    files = ["tests/test_gpu_ready.py", "tests/test_memory.py", "tests/test_model.py"]
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=150)
    tail = (p.stdout + p.stderr).strip().splitlines()
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed)", line)), tail[-1] if tail else "")
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|error|errors|skipped)", summary)) or summary
    if p.returncode:
        failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))][:3]
        counts += " | " + "; ".join(failed)
    return [("tests", f"{len(files)} files, MEMTRANS_TEST_DEVICE={device.type}", f"{counts} ({time.time() - t0:.0f} s)",
             "all pass", p.returncode == 0)]


# ---- retrieval -----------------------------------------------------------------------------------------------
def fill(mem, n, gen_device, chunk=16384):
    B, H, D = mem.batch_size, mem.heads, mem.head_dim
    for start in range(0, n, chunk):
        t = min(chunk, n - start)
        k = torch.nn.functional.normalize(torch.randn(B, H, t, D, device=gen_device), dim=-1)
        mem.add(k, k, torch.arange(start, start + t, device=gen_device).expand(B, t))


def recall(a, b):
    """Share of b's top-k indices that a also returned, over all queries."""
    hit = (a.indices[..., :, None] == b.indices[..., None, :]) & b.valid[..., None, :]
    return float(hit.any(-2).sum() / b.valid.sum())


def run_retrieval(device, s, peak, full):
    from memtrans.memory import ExactMemory
    rows = []
    B, H, T, D, k = s["batch"], s["heads"], s["queries"], s["head_dim"], s["k"]
    for n in s["sizes"]:
        mem = ExactMemory(B, H, D, n, dtype=torch.bfloat16, score_dtype=torch.float32, device=device, fast=False)
        fill(mem, n, device)
        q = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=device), dim=-1)
        flops = 2 * B * H * T * n * D
        ref = mem.search(q, k)
        cases = [("fp32 queries, IEEE fp32", "ieee", q), ("fp32 queries, TF32", "tf32", q),
                 ("bf16 queries, fp32 sums", "ieee", q.to(torch.bfloat16))]
        for name, prec, qq in cases:
            if prec == "tf32" and device.type != "cuda":
                continue
            mem.cuda_fp32_precision = prec
            ms = timed(lambda: mem.search(qq, k), device, s["reps"]) * 1e3
            r = recall(mem.search(qq, k), ref)
            x = ms / 1e3 / (flops / peak)
            target, ok = "", None
            if full and n == 65536 and name.startswith("bf16"):
                target, ok = "<= 3x bf16 peak", x <= 3
            rows.append(("retrieval", f"{_size(n)} B={B} {name}", f"{ms:.2f} ms, recall@{k} {r:.3f}, {x:.1f}x peak",
                         target, ok))
        del mem, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _size(n):
    """The paper's names: 65536 = 65K, 262144 = 262K, 2**20 = 1M."""
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n // 1000}K"


# ---- training step -------------------------------------------------------------------------------------------
def model_flops(model, cfg, B, T):
    P = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    L = 2 * T
    att = 3 * cfg.depth * 4 * B * T * L * cfg.heads * cfg.head_dim
    mem = 3 * len(cfg.memory_layers) * 4 * B * T * cfg.knn_k * cfg.heads * cfg.head_dim
    return 6 * P * B * T + att + mem


def run_train(device, s, peak, full):
    from memtrans import ModelConfig
    from memtrans.device import autocast_context
    from memtrans.model import MemorizingTransformer
    B, T = s["train_batch"], s["segment"]
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows, base = [], None
    # each memory size with the policy's score dtype (auto: bfloat16 on a bf16 GPU, bf16 products summed in fp32)
    # and with float32 scores (qk-norm queries are fp32 under autocast, so IEEE fp32 products)
    for n, score in [(0, "auto")] + [(n, sd) for n in s["train_sizes"] for sd in ("auto", "float32")]:
        cfg = ModelConfig(vocab_size=s["vocab"], dim=s["dim"], depth=s["depth"], heads=s["heads"], head_dim=s["head_dim"],
                          segment_len=T, memory_layers=(s["mem_layer"],) if n else (), memory_size=max(n, 1024),
                          knn_k=s["k"], score_dtype=score)
        torch.manual_seed(0)
        model = MemorizingTransformer(cfg).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        state = model.init_state(B)
        for mem in state.memories.values():  # a full memory: every step pays the full retrieval
            fill(mem, n, device)
        amp = autocast_context(precision, device)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

        def step():
            nonlocal state
            with amp:
                logits, state = model(tokens[:, :-1], state)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.xl = [None if c is None else (c[0].detach(), c[1].detach()) for c in state.xl]

        for _ in range(s["warmup"]):
            step()
        sec = timed(step, device, s["steps"])
        mfu = model_flops(model, cfg, B, T) / sec / peak
        base = base or sec
        name = "no memory" if not n else f"{_size(n)} memory at layer {s['mem_layer']}, {score} scores"
        target, ok = "", None
        if full and n:
            limit = 1.15 if n == 65536 else 1.35
            target, ok = f"<= {limit:.2f}x no-memory", sec / base <= limit
        rows.append(("train step", f"{name}, B={B} T={T} {precision}",
                     f"{B * T / sec:,.0f} tok/s, MFU {100 * mfu:.1f}%, {sec / base:.2f}x no-memory", target, ok))
        del model, opt, state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- ablate smoke --------------------------------------------------------------------------------------------
def run_ablate(device):
    out = Path(tempfile.mkdtemp(prefix="memtrans-gpu-check-"))
    cmd = [sys.executable, "-m", "memtrans", "ablate", "plans/memorizing_transformers.yaml", "--preset", "ci",
           "--only", "Memory Ablation", "--out", str(out / "ablate"), "--no-progress",
           "--set", f"train.device={device.type}", "--set", "train.steps=6", "--set", "train.checkpoint_every=6"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
        rc, log = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        rc, log = "timeout", ""
    statuses = [json.loads(f.read_text()).get("status") for f in (out / "ablate").rglob("status.json")]
    done = sum(st == "finished" for st in statuses)
    result = f"rc {rc}, {done}/{len(statuses)} runs finished ({time.time() - t0:.0f} s)"
    if rc != 0:
        result += " | " + " ".join(log.strip().splitlines()[-2:])[:200]
    return [("ablate", f"ci preset, Memory Ablation, 6 steps, train.device={device.type}", result,
             "every run finishes", rc == 0 and done == len(statuses) > 0)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: tests,retrieval,train,ablate")
    ap.add_argument("--batch", type=int, default=None, help="training-step batch (default 8; 2 tiny)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = not args.tiny and device.type == "cuda"
    s = dict(FULL if full else TINY)
    if args.batch:
        s["train_batch"] = args.batch
    peak = bf16_peak(device, 8192 if full else 512)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# memtrans gpu_check ({'full' if full else 'tiny'}): {name}, torch {torch.__version__}, "
          f"measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    skip = set(filter(None, args.skip.split(",")))
    rows, t0 = [], time.time()
    print("\n| check | case | result | target |\n|---|---|---|---|", flush=True)  # rows print as they finish
    for section, fn in (("tests", lambda: run_tests(device)), ("retrieval", lambda: run_retrieval(device, s, peak, full)),
                        ("train", lambda: run_train(device, s, peak, full)), ("ablate", lambda: run_ablate(device))):
        if section in skip:
            continue
        try:
            new = fn()
        except Exception as e:  # one failing section still prints the others
            new = [(section, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "", False)]
        for check, case, result, target, ok in new:
            verdict = "" if ok is None else (" met" if ok else " NOT MET")
            print(f"| {check} | {case} | {result} | {target}{verdict if target else (' FAILED' if ok is False else '')} |",
                  flush=True)
        rows += new
    print(f"\n# {time.time() - t0:.0f} s; {'targets apply' if full else 'tiny shapes: no targets (a pipeline check)'}")
    return 1 if any(ok is False for *_, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
