"""scripts/scale_study.py: budgets parse, and the memory's gain is paired by seed (no memory - memory)."""
import csv
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("scale_study", Path(__file__).resolve().parents[1] / "scripts" / "scale_study.py")
scale_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale_study)


def test_budgets_parse_and_bad_ones_name_the_flag():
    assert scale_study.parse_budgets("0.6M:3, 2.5M,40M:1") == [(600_000, 3), (2_500_000, None), (40_000_000, 1)]
    with pytest.raises(SystemExit, match="--budgets"):
        scale_study.parse_budgets("lots")


def write_results(out: Path, rows: list[tuple[str, int, float, float]]) -> None:
    out.mkdir(parents=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["hash", "study", "variant", "seed", "status", "far_bucket", "far_ppl", "eval.bpb",
                    "eval.by_position.8K+.bpb"])
        for i, (variant, seed, ppl, bpb) in enumerate(rows):
            w.writerow([f"h{i}", "x", variant, seed, "finished", "8K+", ppl, bpb + 1, bpb])
        w.writerow(["hf", "x", "no memory", 9, "failed", "", "", "", ""])  # not counted


def test_gain_is_paired_by_seed(tmp_path):
    # seed effects of +-1 dominate; the memory is better by exactly 0.5 in every seed
    write_results(tmp_path / "600K", [("baseline", 0, 10.0, 3.0), ("no memory", 0, 10.5, 3.1),
                                      ("baseline", 1, 12.0, 3.2), ("no memory", 1, 12.5, 3.3),
                                      ("baseline", 2, 11.0, 3.4), ("no memory", 2, 11.5, 3.5)])
    g = scale_study.gains(scale_study.read_rows(tmp_path / "600K"))
    assert g["seeds"] == [0, 1, 2]
    assert g["far_ppl"]["gain"].diff == pytest.approx(0.5) and g["far_ppl"]["gain"].lo == pytest.approx(0.5)
    assert g["far_bpb"]["gain"].diff == pytest.approx(0.1)
    text = scale_study.write_summary(tmp_path, [(600_000, 3), (2_500_000, 3)])
    assert "| 600K | 3 | 8K+ | 11.0000 | 11.5000 | +0.5000 [+0.5000, +0.5000] memory better" in text
    assert "| 2.5M | 0 |" in text and (tmp_path / "gain.png").stat().st_size > 0
