"""`memtrans info`: the policy and the retrieval path it reports are the ones the code takes."""
import subprocess
import sys

from memtrans.memory import ExactMemory, fast_topk


def info(*args, env=None):
    import os
    r = subprocess.run([sys.executable, "-m", "memtrans", "info", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_info_reports_policy_and_the_active_kernel():
    out = info("--set", "train.device=cpu")
    assert "policy (train.device=cpu): device cpu, precision " in out
    path, why = ExactMemory(1, 1, 32, 64).explain_path()
    assert f"exact: {path}: {why}" in out
    if fast_topk.isa():
        assert f"{fast_topk.isa()} kernel" in out


def test_info_shows_forced_levels_and_the_reference():
    out = info(env={"MEMTRANS_CPU_ISA": "reference", "MEMTRANS_BF16": "0"})
    assert "exact: reference: no kernel loaded (MEMTRANS_CPU_ISA=reference)" in out
    assert "precision fp32, memory float32, scores float32 (MEMTRANS_BF16=0)" in out
    out = info(env={"MEMTRANS_CPU_ISA": "portable"})
    assert "exact: fused: portable kernel" in out and "skipped: MEMTRANS_CPU_ISA=portable" in out
