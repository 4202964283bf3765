"""benchmarks/gpu_check.py keeps working on a CPU at tiny scale (the GPU check is run only where a GPU is lent,
so CI is what notices when it breaks). Its tests section is this suite, and its ablate section is covered by
test_ablate_e2e; here the retrieval and training-step sections run and must print every row."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_at_tiny_scale_on_cpu():
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--skip", "tests,ablate"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| check")]
    retrieval = [r for r in rows if r.startswith("| retrieval |")]
    train = [r for r in rows if r.startswith("| train step |")]
    assert len(retrieval) >= 3 and all("recall@" in r for r in retrieval), p.stdout
    assert any("no memory" in r for r in train) and any("memory at layer" in r for r in train), p.stdout
    assert not any("error" in r.split("|")[2] for r in rows), p.stdout
