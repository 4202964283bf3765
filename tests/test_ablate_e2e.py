"""End to end: the real plan, `ci` preset, real trainer and evaluator; the report covers every study and variant."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "plans" / "memorizing_transformers.yaml"


@pytest.mark.slow
def test_ci_preset_runs_whole_plan_and_reports_every_variant(tmp_path):
    out = tmp_path / "ablation"
    proc = subprocess.run([sys.executable, "-m", "memtrans", "ablate", str(PLAN), "--preset", "ci", "--out", str(out),
                           "--jobs", "2", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    plan = yaml.safe_load(PLAN.read_text())
    report = (out / "REPORT.md").read_text()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows and all(r["status"] == "finished" for r in rows), [(r["variant"], r["status"], r["error"]) for r in rows]
    for r in rows:
        for col in ("eval.ppl", "eval.bpb", "eval.acc", "summary.final_loss"):
            assert math.isfinite(float(r[col])), (r["variant"], col, r[col])

    for study in plan["studies"]:
        assert f"## {study['name']}" in report
        section = report.split(f"## {study['name']}", 1)[1].split("\n## ", 1)[0]
        variants = [study.get("variant")] if study["action"] == "REMOVE" else [x["name"] for x in study["replacements"]]
        for name in ["baseline"] + variants:
            line = next((ln for ln in section.splitlines() if ln.startswith(f"| {name} |")), None)
            assert line is not None, f"{study['name']}: no table row for {name}"
            cells = [c.strip() for c in line.strip("|").split("|")]
            ppl = float(cells[2].split()[0])  # "| variant | seeds | perplexity ..."
            assert math.isfinite(ppl) and ppl > 1.0
    for png in ("plots/curves-memory-ablation.png",):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-running the same plan skips every finished run: no run directory is touched.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    assert len(stamps) == len(rows)
    again = subprocess.run([sys.executable, "-m", "memtrans", "ablate", str(PLAN), "--preset", "ci", "--out", str(out),
                            "--no-progress", "--no-report"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == stamps
