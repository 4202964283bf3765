import os
import tempfile
from pathlib import Path

import pytest
import torch

# One intra-op thread per test process: tests run two at a time (pytest -n 2) on 2 cores, and
# single-threaded kernels keep results bit-for-bit reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches tokenised data in its own directory, never in the user's cache."""
    monkeypatch.setenv("MEMTRANS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config):
    # one log per run, shared by the xdist workers (they inherit the environment): which retrieval paths ran
    if not hasattr(config, "workerinput") and "MEMTRANS_TEST_PATHS_LOG" not in os.environ:
        os.environ["MEMTRANS_TEST_PATHS_LOG"] = str(Path(tempfile.mkdtemp(prefix="memtrans-paths-")) / "paths.txt")


def record_retrieval_path(name: str) -> None:
    """Note that a test exercised retrieval path `name` (printed at the end of the run)."""
    log = os.environ.get("MEMTRANS_TEST_PATHS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")


def pytest_terminal_summary(terminalreporter):
    from collections import Counter

    from memtrans.memory import fast_topk
    log = os.environ.get("MEMTRANS_TEST_PATHS_LOG")
    counts = Counter(Path(log).read_text().split()) if log and Path(log).exists() else Counter()
    ran = ", ".join(f"{k} ({n} tests)" for k, n in sorted(counts.items())) or "none"
    terminalreporter.write_line(f"retrieval paths exercised against the reference: {ran}")
    fails = fast_topk.failures()
    if fails:
        terminalreporter.write_line("kernels not runnable here: " + "; ".join(f"{k}: {v}" for k, v in fails.items()))
