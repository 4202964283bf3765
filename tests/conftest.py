import os

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
