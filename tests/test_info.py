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


def test_a_failed_build_is_remembered_and_reported(tmp_path, monkeypatch):
    """A compiler that fails is asked once per level: later loads read the .failed file instead of rebuilding."""
    calls = tmp_path / "calls"
    cxx = tmp_path / "bad-cxx"
    cxx.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'error: no such compiler feature' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("MEMTRANS_EXT_CACHE", str(tmp_path / "cache"))
    try:
        assert fast_topk.use_isa("portable") is None
        assert "no such compiler feature" in fast_topk.failures()["portable"]
        assert calls.read_text().count("x") == 1 and list((tmp_path / "cache").glob("*.failed"))
        assert fast_topk.use_isa("portable") is None  # a second process (or load) does not rebuild
        assert calls.read_text().count("x") == 1
        assert "an earlier build failed" in fast_topk.failures()["portable"]
    finally:
        monkeypatch.undo()
        fast_topk.use_isa(None)
