"""Report: numbers computed from hand-made run files (known means, std, t- and Welch intervals), CSV, plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from memtrans.ablation import report
from memtrans.ablation.plan import load_plan, resolve
from memtrans.ablation.report import describe, t_quantile, welch

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_t_quantiles_match_tables():
    for df, t in [(1, 12.706205), (2, 4.302653), (10, 2.228139), (2.8824, 3.257176), (1e6, 1.959966)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=2e-6)


def test_describe_and_welch():
    b, v = describe([10, 12]), describe([14, 16, 18])
    assert (b.n, b.mean, b.std) == (2, 11.0, pytest.approx(math.sqrt(2)))
    assert (b.lo, b.hi) == (pytest.approx(11 - 12.706205, abs=1e-5), pytest.approx(11 + 12.706205, abs=1e-5))
    assert (v.lo, v.hi) == (pytest.approx(11.031725, abs=1e-6), pytest.approx(20.968275, abs=1e-6))
    d = welch(v, b)  # scipy.stats.ttest_ind(equal_var=False).confidence_interval(): (0.0245324, 9.9754676)
    assert (d.diff, d.lo, d.hi, d.resolved) == (5.0, pytest.approx(0.0245324, abs=1e-6),
                                                pytest.approx(9.9754676, abs=1e-6), True)
    assert welch(describe([1.0]), b) is None
    assert describe([]) is None and describe([3.0]).std == 0.0


def _write_run(out: Path, h: str, *, ppl: float = 11.0, acc: float = 0.5, status: str = "finished",
               heads: int = 2, layers=(2,), spikes: int = 0, gates_none: bool = False):
    d = out / "runs" / h
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"status": status, "step": 30,
                                               "error": "exit code 1 from: train: OOM" if status == "failed" else None}))
    if status == "failed":
        return
    loss = math.log(ppl)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss + 1 / (s + 1), "grad_norm": 1 + s / 10,
                                                         "tokens_per_s": 200.0}) + "\n" for s in range(0, 31, 5)))
    (d / "summary.json").write_text(json.dumps({"final_loss": loss, "loss_spikes": spikes, "grad_spikes": 1,
                                                "clipped_fraction": 0.25, "diverged": status == "diverged",
                                                "tokens_per_s": 200.0, "steps": 30}))
    (d / "eval.json").write_text(json.dumps({
        "split": "test", "loss": loss, "ppl": ppl, "bpb": loss / math.log(2), "acc": acc, "tokens": 9000,
        "by_position": [{"bucket": "0-2K", "lo": 0, "hi": 2048, "ppl": ppl, "tokens": 5000},
                        {"bucket": "2K-8K", "lo": 2048, "hi": 8192, "ppl": ppl + 1, "tokens": 1500},
                        {"bucket": "8K-32K", "lo": 8192, "hi": 32768, "ppl": 99.0, "tokens": 10}],
        "recall": {"acc": 0.75, "chance": 0.1, "tokens": 64, "by_distance": [{"lo": 0, "hi": 512, "acc": 0.75,
                                                                              "tokens": 64}],
                   "far_acc": 0.5, "far_tokens": 60, "far_min_distance": 161, "local_reach": 159},
        "diagnostics": {"gates": {str(layer): None if gates_none else [0.25 + 0.5 * h / heads for h in range(heads)]
                                  for layer in layers}}}))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """An ablation output dir: ci preset, 3 seeds, every file written by hand with known numbers."""
    out = tmp_path_factory.mktemp("ablation")
    resolved = resolve(load_plan(ROOT / "plans" / "memorizing_transformers.yaml"), "ci", seeds=[0, 1, 2])
    record = {**resolved.record(), "command": "memtrans ablate plans/memorizing_transformers.yaml --preset ci",
              "environment": {"cpu": "Test CPU", "cores": 2, "gpu": None, "versions": {"python": "3.11"}},
              "wall_time_s": 75.0, "executor": "local", "jobs": 1}
    (out / "plan.json").write_text(json.dumps(record))
    variants = {s.name: {v.name: v for v in vs} for s, vs in resolved.studies}
    written = set()

    def runs_of(study, name):
        return variants[study][name].runs

    base = runs_of("Memory Size", "baseline")
    _write_run(out, base[0], ppl=10.0)
    _write_run(out, base[1], ppl=12.0)
    _write_run(out, base[2], status="failed")
    for h, p in zip(runs_of("Memory Size", "8K"), (14.0, 16.0, 18.0)):
        _write_run(out, h, ppl=p)
    _write_run(out, runs_of("Memory Size", "32K")[0], ppl=13.0)  # seeds 1, 2 never started
    qk = runs_of("Key/Query Normalization", "no qk-norm")
    _write_run(out, qk[0], ppl=11.5, spikes=4)
    _write_run(out, qk[1], ppl=50.0, status="diverged", spikes=9)
    _write_run(out, qk[2], ppl=11.5, spikes=5)
    written |= set(base) | set(runs_of("Memory Size", "8K")) | {runs_of("Memory Size", "32K")[0]} | set(qk)
    for h, spec in resolved.runs.items():
        if h not in written and spec.members[0][1] not in ("32K",):
            _write_run(out, h, layers=spec.config["model"]["memory_layers"],
                       gates_none=spec.config["model"]["gate"] == "concat")  # as the evaluator writes it
    assert report.main([str(out)]) == 0
    return out, resolved


def test_report_tables_hold_exact_statistics(out):
    out, _ = out
    md = (out / "REPORT.md").read_text()
    assert "| baseline | 2/3 | 11.0000 ± 1.4142 [-1.7062, 23.7062] |" in md
    assert "| 8K | 3/3 | 16.0000 ± 2.0000 [11.0317, 20.9683] |" in md
    assert "| 8K | +5.0000 [0.0245, 9.9755] **\\*** |" in md
    assert "- **8K**: perplexity is higher than baseline by 5.0000 (95% CI [0.0245, 9.9755])" in md
    assert "| 32K | 1/3 | 13.0000 (1 seed) |" in md
    assert "- **32K**: perplexity: single seed, not resolved (13.0000 vs 11.0000)" in md
    assert "| 32K | single seed, not resolved |" in md
    # far-position bucket: 2K-8K is the highest with >= 1000 tokens in every run; its ppl is ppl + 1
    assert "far-position ppl (2K-8K)" in md and "12.0000 ± 1.4142" in md
    # recall accuracy 0.75 everywhere: no resolved difference, never a claim
    assert "no resolved difference in recall accuracy" in md and "no resolved difference in far recall accuracy" in md
    # "far" as the evaluator defined it: beyond the model's local reach (ci: segment 32 x (depth 4 + 1) - 1)
    assert ("far recall accuracy only over queries at distance >= 161 tokens from their binding, beyond "
            "the model's local reach of 159 tokens") in md
    # qk-norm: the diverged run is out of the quality numbers and counted under stability
    assert "| no qk-norm | 2/3 | 11.5000 ± 0.0000 [11.5000, 11.5000] |" in md
    assert "| no qk-norm | 3/3 | 6.0000 ± 2.6458 [-0.5724, 12.5724] |" in md  # loss spikes 4, 9, 5
    assert "diverged in 1 of 3 runs (baseline 0 of 3)" in md
    assert "Failed runs:" in md and "exit code 1 from: train: OOM" in md
    assert "Memory-size scale factor: 1/256 (8192 -> 32, 32768 -> 128, 65536 -> 256" in md
    assert "Hardware: Test CPU, 2 cores; GPU: none" in md and "wall time: 75 s" in md
    assert "`memtrans ablate plans/memorizing_transformers.yaml --preset ci`" in md


def test_results_csv_one_row_per_run(out):
    out, resolved = out
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(resolved.runs) == 42
    by_hash = {r["hash"]: r for r in rows}
    size = {s.name: {v.name: v for v in vs} for s, vs in resolved.studies}["Memory Size"]
    assert [float(by_hash[h]["eval.ppl"]) for h in size["8K"].runs] == [14.0, 16.0, 18.0]
    assert {by_hash[h]["study"] for h in size["8K"].runs} == {"Memory Size"}
    assert [by_hash[h]["status"] for h in size["baseline"].runs] == ["finished", "finished", "failed"]
    assert by_hash[size["baseline"].runs[0]]["variant"] == "baseline"
    assert by_hash[size["baseline"].runs[0]]["study"] == "all"
    assert [by_hash[h]["status"] for h in size["32K"].runs] == ["finished", "pending", "pending"]
    assert float(by_hash[size["8K"].runs[0]]["far_ppl"]) == 15.0
    assert by_hash[size["8K"].runs[0]]["summary.clipped_fraction"] == "0.25"
    assert by_hash[size["8K"].runs[0]]["override.model.memory_size"] == "32"
    assert by_hash[size["8K"].runs[0]]["eval.recall.acc"] == "0.75"


def test_plots_exist_are_pngs_and_are_embedded(out):
    out, _ = out
    md = (out / "REPORT.md").read_text()
    for name in ["curves-memory-ablation.png", "curves-memory-size.png", "ppl-vs-memory-size-memory-size.png",
                 "ppl-vs-layer-layer-position.png", "gates-gating-mechanism.png",
                 "grad-norms-key-query-normalization.png"]:
        path = out / "plots" / name
        assert path.read_bytes()[:8] == PNG, name
        assert f"(plots/{name})" in md


def test_report_without_plan_record_says_so(tmp_path):
    with pytest.raises(ValueError, match="no plan.json"):
        report.write_report(tmp_path)


def test_paired_interval_uses_per_seed_differences():
    from memtrans.ablation.report import describe, paired, welch
    variant = [(0, 1.0), (1, 2.0), (2, 3.0), (7, 9.0)]  # seed 7 has no baseline partner: ignored
    base = [(0, 0.5), (1, 1.6), (2, 2.4), (3, 100.0)]
    d = paired(variant, base)
    assert d.diff == pytest.approx(0.5) and d.resolved and d.lo > 0.2 and d.hi < 0.8
    # the same numbers unpaired: the spread between seeds hides the shift
    w = welch(describe([1.0, 2.0, 3.0]), describe([0.5, 1.6, 2.4]))
    assert not w.resolved and w.diff == pytest.approx(0.5)
    assert paired([(0, 1.0), (1, None)], [(0, 0.0), (1, 0.0)]) is None  # one usable pair only


def test_identical_variants_are_reported_as_identical_never_compared(tmp_path):
    """recall preset: bottom and middle layer are the baseline's runs (depth 2); no interval against themselves."""
    resolved = resolve(load_plan(ROOT / "plans" / "memorizing_transformers.yaml"), "recall", seeds=[0, 1, 2])
    record = {**resolved.record(), "command": "memtrans ablate ... --preset recall", "environment": {}}
    (tmp_path / "plan.json").write_text(json.dumps(record))
    for i, (h, spec) in enumerate(resolved.runs.items()):
        _write_run(tmp_path, h, ppl=10.0 + i % 3, layers=spec.config["model"]["memory_layers"])
    md = report.write_report(tmp_path).read_text()
    section = md.split("## Layer Position", 1)[1]
    for name in ("bottom layer", "middle layer"):
        assert f"- **{name}**: identical to baseline at depth 2 (the same configuration, so the same runs)" in section
        assert section.count(f"| {name} | identical to baseline at depth 2 | - |") == 2  # Welch and paired tables
        assert f"- **{name}**: no resolved" not in section
        rows = [ln for ln in section.splitlines() if ln.startswith(f"| {name} |")]
        assert len(rows) == 4 and all("[-" not in ln for ln in rows[2:])  # quality, stability, then no intervals
    assert "- **top layer**: " in section and "no resolved difference" in section.split("- **top layer**: ")[1]
    assert "**Identical variants:** Layer Position: bottom layer is identical to baseline at depth 2" in md
    # an older plan.json without identical_to: read from the run lists the same way
    for s in record["studies"]:
        for v in s["variants"]:
            v.pop("identical_to"), v.pop("depth")
    assert report.identities(record) == {("Layer Position", "bottom layer"): "identical to baseline at depth 2",
                                         ("Layer Position", "middle layer"): "identical to baseline at depth 2"}
