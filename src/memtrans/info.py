"""`memtrans info [--config FILE] [--set key=value ...]`: what this machine will do, to paste into a bug report.

Device, CPU capability, the precision policy's resolved values (for the given config, or the defaults) and
which retrieval path each memory engine takes here (which kernel ISA, or the torch reference, and why)."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def report(cfg) -> list[str]:
    import memtrans
    from memtrans.device import DTYPES, cpu_capability, policy_of, resolve_device
    from memtrans.memory import ExactMemory, fast_topk

    lines = []
    try:
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "not installed"
    lines.append(f"memtrans {memtrans.__version__} | torch {torch.__version__} | faiss {faiss_version} | "
                 f"Python {platform.python_version()} | {platform.system()} {platform.machine()}")
    cap = cpu_capability()
    lines.append(f"CPU: {cap['model']} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | "
                 f"torch capability {cap['isa']} | AVX512_BF16 {'yes' if cap['avx512_bf16'] else 'no'} | "
                 f"AMX {'yes' if cap['amx'] else 'no'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")
    device = resolve_device(cfg.train.device)
    p = policy_of(cfg, device)
    lines.append(f"policy (train.device={cfg.train.device}): {p.describe()}")
    mem_dtype, score_dtype = DTYPES[p.memory_dtype], DTYPES[p.score_dtype]
    lines.append("retrieval (memory_backend):")
    path, why = ExactMemory(1, 1, cfg.model.head_dim, 64, dtype=mem_dtype, score_dtype=score_dtype,
                            device=device).explain_path()
    lines.append(f"  exact: {path}: {why}")
    for isa, reason in fast_topk.failures().items():
        lines.append(f"    kernel {isa} not used: {reason}")
    lines.append(f"    kernel cache: {fast_topk._cache_dir()}; MEMTRANS_CPU_ISA={os.environ.get('MEMTRANS_CPU_ISA', '(unset)')}")
    lines.append(f"  faiss_flat: faiss.knn per (slot, head) on fp32 host copies of the ring (faiss {faiss_version})")
    lines.append(f"  faiss_ivf: one faiss IndexIVFFlat per (slot, head), nlist {cfg.model.ivf_nlist}, "
                 f"nprobe {cfg.model.ivf_nprobe} (approximate)")
    return lines


def main(argv: list[str] | None = None) -> int:
    from memtrans.config import load_config

    ap = argparse.ArgumentParser(prog="memtrans info", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config whose policy to resolve (defaults when omitted)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, list(args.overrides))
    print("\n".join(report(cfg)))
    sys.stdout.flush()
    return 0
