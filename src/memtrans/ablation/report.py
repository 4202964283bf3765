"""`memtrans report OUT_DIR`: REPORT.md, results.csv and plots from OUT/plan.json and the run directories.

Reads files only (plan.json, runs/<hash>/{status,summary,eval}.json, metrics.jsonl); never the model.
Intervals: 95% t-intervals over seeds; differences against the baseline use Welch's interval and are
called resolved only when the interval excludes zero. A second, paired table takes the difference per seed
(a variant and the baseline of one seed share the data order and, under --pretrain-steps, the starting
weights) and gives the t-interval of those differences: the sharper test when seeds pair up.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrans.ablation.plan import format_seconds
from memtrans.utils import atomic_write_text, read_json

MIN_BUCKET_TOKENS = 1000  # a position bucket needs this many evaluated tokens in every run to be "far"
CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------ statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with (possibly fractional) df, for 0.5 <= p < 1, by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Stat:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); 0 for one value
    lo: float  # 95% t-interval of the mean (nan for one value)
    hi: float


def describe(values: list[float]) -> Stat | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return Stat(1, mean, 0.0, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half)


@dataclass
class Diff:
    diff: float  # variant - baseline
    lo: float
    hi: float

    @property
    def resolved(self) -> bool:
        return self.lo > 0 or self.hi < 0


def welch(variant: Stat | None, base: Stat | None) -> Diff | None:
    """Welch interval on the difference of means; None unless both sides have >= 2 values."""
    if variant is None or base is None or variant.n < 2 or base.n < 2:
        return None
    d = variant.mean - base.mean
    va, vb = variant.std ** 2 / variant.n, base.std ** 2 / base.n
    se2 = va + vb
    if se2 == 0:
        return Diff(d, d, d)
    df = se2 ** 2 / (va ** 2 / (variant.n - 1) + vb ** 2 / (base.n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, df) * math.sqrt(se2)
    return Diff(d, d - half, d + half)


def paired(variant: list[tuple[int, float | None]], base: list[tuple[int, float | None]]) -> Diff | None:
    """t-interval of the per-seed differences variant - baseline over seeds present (and finite) in both;
    None with fewer than 2 pairs."""
    b = {seed: x for seed, x in base if x is not None and math.isfinite(x)}
    d = describe([x - b[seed] for seed, x in variant if x is not None and math.isfinite(x) and seed in b])
    if d is None or d.n < 2:
        return None
    return Diff(d.mean, d.lo, d.hi)


# ------------------------------------------------------------------------------------ run data

@dataclass
class Run:
    hash: str
    dir: Path
    seed: int
    members: list[tuple[str, str]]
    status: str  # finished | diverged | failed | running | pending
    error: str | None
    summary: dict
    eval: dict
    _metrics: list[dict] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Counts for quality metrics: finished and evaluated (diverged runs are counted under stability)."""
        return self.status == "finished" and bool(self.eval)

    @property
    def trained(self) -> bool:
        return self.status in ("finished", "diverged") and bool(self.summary)

    def metrics(self) -> list[dict]:
        if self._metrics is None:
            rows = []
            try:
                for line in (self.dir / "metrics.jsonl").read_text().splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass  # a line being written
            except OSError:
                pass
            self._metrics = rows
        return self._metrics


def _read(path: Path) -> dict:
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def load_runs(out: Path, record: dict) -> dict[str, Run]:
    runs = {}
    for h, info in record["runs"].items():
        d = out / "runs" / h
        status = _read(d / "status.json")
        runs[h] = Run(h, d, info["seed"], [tuple(m) for m in info["members"]],
                      status.get("status", "pending") if d.exists() else "pending", status.get("error"),
                      _read(d / "summary.json"), _read(d / "eval.json"))
    return runs


def far_bucket(runs: list[Run], min_tokens: int) -> str | None:
    """The highest document-position bucket with >= min_tokens evaluated tokens in every evaluated run."""
    evaluated = [r for r in runs if r.ok and r.eval.get("by_position")]
    if not evaluated:
        return None
    best = None
    for b in sorted(evaluated[0].eval["by_position"], key=lambda b: b.get("lo", 0)):
        label = b["bucket"]
        if all(any(x["bucket"] == label and x.get("tokens", 0) >= min_tokens for x in r.eval["by_position"])
               for r in evaluated):
            best = label
    return best


def _far_ppl(run: Run, bucket: str | None) -> float | None:
    for b in run.eval.get("by_position") or []:
        if b["bucket"] == bucket:
            return b.get("ppl")
    return None


def _recall(run: Run, key: str = "acc") -> float | None:
    rec = run.eval.get("recall")
    return rec.get(key) if isinstance(rec, dict) else None


def far_text(runs: list[Run]) -> str | None:
    """What "far recall" meant in these runs' evaluations (eval.json's recall.far_min_distance, local_reach)."""
    seen = sorted({(r.eval["recall"].get("far_min_distance"), r.eval["recall"].get("local_reach"))
                   for r in runs if r.ok and isinstance(r.eval.get("recall"), dict)}, key=str)
    if not seen:
        return None
    parts = []
    for far, reach in seen:
        if reach is None:
            parts.append(f"distance >= {far} tokens from their binding (2 x segment_len: evaluated before far was defined by the "
                         f"model's reach, so it may include queries the model reaches locally)")
        else:
            parts.append(f"distance >= {far} tokens from their binding, beyond the model's local reach of {reach} tokens "
                         f"(segment_len x (depth + 1) - 1 with the XL cache, no memory)")
    return ("Recall accuracy is over every scored query; far recall accuracy only over queries at "
            + "; or ".join(parts) + ": only a memory can answer those.")


# (key, heading, how to read it from a run, better when lower?)
QUALITY = [
    ("ppl", "perplexity", lambda r, fb: r.eval.get("ppl"), True),
    ("bpb", "bits per byte", lambda r, fb: r.eval.get("bpb"), True),
    ("acc", "accuracy", lambda r, fb: r.eval.get("acc"), False),
    ("far_ppl", "far-position perplexity", _far_ppl, True),
    ("recall_acc", "recall accuracy", lambda r, fb: _recall(r), False),
    ("far_recall_acc", "far recall accuracy", lambda r, fb: _recall(r, "far_acc"), False),
]
STABILITY = [
    ("loss_spikes", "loss spikes", lambda r: r.summary.get("loss_spikes")),
    ("grad_spikes", "grad spikes", lambda r: r.summary.get("grad_spikes")),
    ("clipped_fraction", "clipped fraction", lambda r: r.summary.get("clipped_fraction")),
    ("final_loss", "final loss", lambda r: r.summary.get("final_loss")),
]
METRIC_KEYS = {"perplexity": ["ppl"], "bits per byte": ["bpb"], "accuracy": ["acc"],
               "far-position perplexity": ["far_ppl"], "recall accuracy": ["recall_acc", "far_recall_acc"],
               "training stability": ["loss_spikes", "grad_spikes"], "tokens per second": []}


def num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}" if abs(x) >= 1000 else f"{x:.4f}"


def signed(x: float) -> str:
    return ("+" if x >= 0 else "") + num(x)


def stat_cell(s: Stat | None) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return f"{num(s.mean)} (1 seed)"
    return f"{num(s.mean)} ± {num(s.std)} [{num(s.lo)}, {num(s.hi)}]"


def _paired_cell(d: Diff | None) -> str:
    if d is None:
        return "fewer than 2 seed pairs"
    return f"{signed(d.diff)} [{num(d.lo)}, {num(d.hi)}]" + (" **\\***" if d.resolved else "")


def diff_cell(d: Diff | None, v: Stat | None, b: Stat | None) -> str:
    if v is None or b is None:
        return "-"
    if d is None:
        return "single seed, not resolved"
    return f"{signed(d.diff)} [{num(d.lo)}, {num(d.hi)}]" + (" **\\***" if d.resolved else "")


# ----------------------------------------------------------------------------------- variants

@dataclass
class VariantData:
    name: str
    info: dict  # from plan.json
    runs: list[Run]
    quality: dict[str, Stat | None] = field(default_factory=dict)
    stability: dict[str, Stat | None] = field(default_factory=dict)
    tokens_per_s: Stat | None = None
    identical: str | None = None  # "identical to baseline at depth 2": the same runs as another variant

    @property
    def label(self) -> str:
        return "baseline" if self.info.get("baseline") else self.name


def identities(record: dict) -> dict[tuple[str, str], str]:
    """(study, variant) -> "identical to <baseline | Study: variant> at depth N" for every variant whose runs are
    the baseline's or an earlier variant's (the same resolved configuration). Read from the run lists, so a
    plan.json written before the resolver recorded `identical_to` is read the same way."""
    depth0 = (record.get("base_config") or {}).get("model", {}).get("depth")
    owner: dict[tuple, str] = {}
    out = {}
    for study in record["studies"]:
        for info in study["variants"]:
            key = tuple(info["runs"])
            if key in owner and not info.get("baseline"):
                out[(study["name"], info["name"])] = f"identical to {owner[key]} at depth {info.get('depth') or depth0}"
            owner.setdefault(key, "baseline" if info.get("baseline") else f"{study['name']}: {info['name']}")
    return out


def variant_data(info: dict, runs: dict[str, Run], bucket: str | None, identical: str | None = None) -> VariantData:
    rs = [runs[h] for h in info["runs"]]
    v = VariantData(info["name"], info, rs, identical=identical)
    ok = [r for r in rs if r.ok]
    trained = [r for r in rs if r.trained]
    for key, _, get, _ in QUALITY:
        v.quality[key] = describe([get(r, bucket) for r in ok])
    for key, _, get in STABILITY:
        v.stability[key] = describe([get(r) for r in trained])
    v.tokens_per_s = describe([r.summary.get("tokens_per_s") for r in trained])
    return v


def summary_lines(study: dict, variants: list[VariantData]) -> list[str]:
    """Plain statements that never claim more than the intervals support."""
    base = variants[0]
    keys = [k for m in study["metrics"] for k in METRIC_KEYS.get(m, [])]
    for key in ("recall_acc", "far_recall_acc"):
        if any(r.ok and _recall(r, "acc" if key == "recall_acc" else "far_acc") is not None
               for v in variants for r in v.runs) and key not in keys:
            keys.append(key)
    headings = {k: h for k, h, *_ in QUALITY} | {k: h for k, h, _ in STABILITY}
    lines = []
    for v in variants[1:]:
        if v.identical:
            lines.append(f"- **{v.name}**: {v.identical} (the same configuration, so the same runs): not a comparison.")
            continue
        parts = []
        for key in keys:
            vs = v.quality.get(key, v.stability.get(key))
            bs = base.quality.get(key, base.stability.get(key))
            heading = headings[key]
            if vs is None or bs is None:
                continue
            d = welch(vs, bs)
            if d is None:
                parts.append(f"{heading}: single seed, not resolved ({num(vs.mean)} vs {num(bs.mean)})")
            elif d.resolved:
                word = "higher" if d.diff > 0 else "lower"
                parts.append(f"{heading} is {word} than baseline by {num(abs(d.diff))} "
                             f"(95% CI [{num(d.lo)}, {num(d.hi)}])")
            else:
                parts.append(f"no resolved difference in {heading} (difference {signed(d.diff)}, "
                             f"95% CI [{num(d.lo)}, {num(d.hi)}])")
        if "training stability" in study["metrics"]:
            div = sum(r.status == "diverged" for r in v.runs)
            bdiv = sum(r.status == "diverged" for r in base.runs)
            parts.append(f"diverged in {div} of {len(v.runs)} runs (baseline {bdiv} of {len(base.runs)})")
        failed = sum(r.status == "failed" for r in v.runs)
        if failed:
            parts.append(f"{failed} of {len(v.runs)} runs failed")
        if not any(r.ok for r in v.runs):
            parts.append("no finished, evaluated run yet")
        lines.append(f"- **{v.name}**: " + "; ".join(parts) + ".")
    return lines


# --------------------------------------------------------------------------------------- output

def _flatten(obj: Any, prefix: str, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for i, x in enumerate(obj):
            name = x.get("bucket") or (f"{x['lo']}-{x['hi']}" if "lo" in x and "hi" in x else str(i))
            _flatten({k: v for k, v in x.items() if k != "bucket"}, f"{prefix}.{name}", out)
    elif isinstance(obj, list):
        out[prefix] = json.dumps(obj)
    else:
        out[prefix] = obj


def results_csv(record: dict, runs: dict[str, Run], bucket: str | None) -> str:
    rows = []
    for h, r in runs.items():
        studies = sorted({s for s, _ in r.members})
        row = {"hash": h, "study": "all" if studies == ["*"] else "; ".join(studies),
               "variant": "; ".join(sorted({v for _, v in r.members})), "seed": r.seed, "status": r.status,
               "error": r.error or "", "far_bucket": bucket or "", "far_ppl": _far_ppl(r, bucket) if r.eval else None}
        _flatten(record["runs"][h].get("overrides", {}), "override", row)
        _flatten(r.summary, "summary", row)
        _flatten({k: v for k, v in r.eval.items() if k != "diagnostics"}, "eval", row)
        _flatten((r.eval.get("diagnostics") or {}).get("gates") or {}, "gates", row)
        rows.append(row)
    fixed = ["hash", "study", "variant", "seed", "status", "error", "far_bucket", "far_ppl"]
    columns = fixed + sorted({k for row in rows for k in row} - set(fixed))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def study_section(study: dict, variants: list[VariantData], bucket: str | None, plots: dict[str, str]) -> list[str]:
    base = variants[0]
    lines = [f"## {study['name']}", "",
             f"Ablated part: {study['ablated'] or '-'}. Action: {study['action']}. "
             f"Metrics: {', '.join(study['metrics'])}.", ""]
    lines += ["### Summary", ""] + summary_lines(study, variants) + [""]
    far = f"far-position ppl ({bucket})" if bucket else "far-position ppl"
    rows = []
    for v in variants:
        ok = sum(r.ok for r in v.runs)
        rows.append([v.label, f"{ok}/{len(v.runs)}"] + [stat_cell(v.quality[k]) for k, *_ in QUALITY]
                    + [stat_cell(v.tokens_per_s)])
    lines += ["### Quality (mean ± std [95% t-interval] over seeds)", ""]
    lines += _table(["variant", "seeds", "perplexity", "bits per byte", "accuracy", far, "recall accuracy",
                     "far recall accuracy", "tokens/s"], rows) + [""]
    rows = []
    for v in variants:
        div = sum(r.status == "diverged" for r in v.runs)
        fl = v.stability["final_loss"]
        spread = "-" if fl is None else f"{num(fl.mean)} ± {num(fl.std)}"
        rows.append([v.label, f"{sum(r.trained for r in v.runs)}/{len(v.runs)}"]
                    + [stat_cell(v.stability[k]) for k in ("loss_spikes", "grad_spikes", "clipped_fraction")]
                    + [f"{div}/{len(v.runs)}", spread])
    lines += ["### Training stability", ""]
    lines += _table(["variant", "runs", "loss spikes", "grad spikes", "clipped fraction", "diverged",
                     "final loss (mean ± std over seeds)"], rows) + [""]
    stab = "training stability" in study["metrics"]
    ncols = len(QUALITY) + (2 if stab else 0)

    def same(v: VariantData) -> list[str]:
        return [v.name, v.identical] + ["-"] * (ncols - 1)

    rows = []
    for v in variants[1:]:
        if v.identical:
            rows.append(same(v))
            continue
        row = [v.name] + [diff_cell(welch(v.quality[k], base.quality[k]), v.quality[k], base.quality[k])
                          for k, *_ in QUALITY]
        if stab:
            row += [diff_cell(welch(v.stability[k], base.stability[k]), v.stability[k], base.stability[k])
                    for k in ("loss_spikes", "grad_spikes")]
        rows.append(row)
    header = (["variant", "Δ perplexity", "Δ bits per byte", "Δ accuracy", f"Δ {far}", "Δ recall accuracy",
               "Δ far recall accuracy"]
              + (["Δ loss spikes", "Δ grad spikes"] if stab else []))
    lines += ["### Change against baseline (variant - baseline, Welch 95% interval; **\\*** = excludes zero)", ""]
    lines += _table(header, rows) + [""]
    rows = []
    for v in variants[1:]:
        if v.identical:
            rows.append(same(v))
            continue
        row = [v.name]
        for key, _, get, _ in QUALITY:
            if v.quality[key] is None or base.quality[key] is None:
                row.append("-")
                continue
            row.append(_paired_cell(paired([(r.seed, get(r, bucket)) for r in v.runs if r.ok],
                                           [(r.seed, get(r, bucket)) for r in base.runs if r.ok])))
        if stab:
            for key, _, get in STABILITY[:2]:
                row.append(_paired_cell(paired([(r.seed, get(r)) for r in v.runs if r.trained],
                                               [(r.seed, get(r)) for r in base.runs if r.trained])))
        rows.append(row)
    lines += ["### Paired change against baseline (per-seed variant - baseline, 95% t-interval over seeds; "
              "**\\*** = excludes zero)", ""]
    lines += _table(header, rows) + [""]
    failed = [(v.label, r) for v in variants for r in v.runs if r.status == "failed"]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {label}, seed {r.seed} (`runs/{r.hash}`): {r.error}"
                                         for label, r in failed] + [""]
    for title, path in plots.items():
        lines += [f"![{title}]({path})", ""]
    return lines


def write_report(out: str | Path, min_bucket_tokens: int = MIN_BUCKET_TOKENS) -> Path:
    """Write OUT/REPORT.md, OUT/results.csv and OUT/plots/*.png; returns the REPORT.md path."""
    from memtrans.ablation import plots

    out = Path(out)
    record = _read(out / "plan.json")
    if not record.get("runs"):
        raise ValueError(f"{out}: no plan.json with runs here; run `memtrans ablate` first")
    runs = load_runs(out, record)
    bucket = far_bucket(list(runs.values()), min_bucket_tokens)
    preset, plan = record["preset"], record["plan"]
    lines = [f"# Ablation report: {plan['name']} (preset `{preset['name']}`)", ""]
    if plan.get("description"):
        lines += [plan["description"], ""]
    counts: dict[str, int] = {}
    for r in runs.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    lines += [f"Runs: {len(runs)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "). "
              f"Seeds: {', '.join(map(str, record['seeds']))}. The baseline (the plan's base configuration) is "
              f"one set of runs shared by every study. Quality columns use finished, evaluated runs; diverged runs "
              f"are counted under training stability. Far-position perplexity is the highest document-position "
              f"bucket (by how much of its document precedes a token, not by distance to a binding) with at least "
              f"{min_bucket_tokens} evaluated tokens in every run: {bucket or 'none had enough tokens'}.", ""]
    recall_note = far_text(list(runs.values()))
    if recall_note:
        lines += [recall_note, ""]
    if preset["memory_size_scale"] != "1":
        lines += [f"**Memory sizes are scaled by {preset['memory_size_scale']}** for this preset; variants keep "
                  f"the plan's nominal names (e.g. 8K).", ""]
    (out / "plots").mkdir(exist_ok=True)
    same = identities(record)
    if same:
        lines += ["**Identical variants:** " + "; ".join(f"{s}: {v} is {text}" for (s, v), text in same.items())
                  + ". They resolve to the same configuration, so their runs are the same runs: the tables show them "
                    "as identical, never as a comparison.", ""]
    for study in record["studies"]:
        variants = [variant_data(info, runs, bucket, same.get((study["name"], info["name"])))
                    for info in study["variants"]]
        made = plots.study_plots(study, variants, out / "plots", preset["memory_size_scale"])
        lines += study_section(study, variants, bucket, {t: p.relative_to(out).as_posix() for t, p in made.items()})
    lines += reproduction(record)
    atomic_write_text(out / "results.csv", results_csv(record, runs, bucket))
    atomic_write_text(out / "REPORT.md", "\n".join(lines).rstrip() + "\n")
    return out / "REPORT.md"


def pretrain_text(record: dict) -> str:
    """How the fine-tuning recipe's starting points were made (plan.json's `pretrains`, written since each seed
    has its own; an older record had one pretrain, seed 0's, shared by every seed)."""
    steps = record["pretrain_steps"]
    pre = record.get("pretrains")
    if not pre:
        return (f"a no-memory model pretrained for {steps} steps (`runs/pretrain/<hash>`, one per distinct non-memory "
                f"config, with seed 0's weights shared by every seed: intervals over seeds leave out the variance of "
                f"the starting point)")
    seeds = sorted({p["seed"] for p in pre.values()})
    tokens = sum(p["tokens"] for p in pre.values())
    return (f"{len(pre)} no-memory models pretrained for {steps} steps each ({tokens:,} tokens in all; "
            f"`runs/pretrain/<hash>`), one per seed ({', '.join(map(str, seeds))}) and distinct non-memory config: "
            f"each seed's variants fine-tune from that seed's pretrain, and the paired tables pair by seed")


def reproduction(record: dict) -> list[str]:
    preset, env = record["preset"], record.get("environment") or {}
    sizes = sorted({(v["memory_size_nominal"], v["memory_size"]) for s in record["studies"] for v in s["variants"]})
    wall = record.get("wall_time_s")
    lines = ["## How this was made", "",
             f"- Command: `{record.get('command', '?')}` (in `{record.get('cwd', '?')}`)",
             f"- Plan: `{record['plan']['file']}`; preset `{preset['name']}`: {preset['description']}",
             "- Preset overrides: " + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in preset["overrides"].items())
                                       or "none"),
             f"- Memory-size scale factor: {preset['memory_size_scale']} ("
             + ", ".join(f"{a} -> {b}" for a, b in sizes) + ")",
             f"- Seeds: {', '.join(map(str, record['seeds']))}",
             f"- Budget per run: {record.get('budget_minutes') or '-'} minutes, {record.get('budget_tokens') or '-'} "
             f"tokens; init from: "
             + (pretrain_text(record) if record.get("pretrain_steps")
                else record.get("init_from") or "none (trained from scratch)"),
             "- Other command-line overrides: " + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in
                                                             record.get("extra_overrides", {}).items()) or "none"),
             f"- Executor: {record.get('executor', '?')} (jobs {record.get('jobs', '?')})",
             f"- Hardware: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; GPU: {env.get('gpu') or 'none'}",
             "- Software: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()),
             f"- Started {record.get('started', '?')}; wall time: "
             + (format_seconds(wall) if wall is not None else "still running (or interrupted)"), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memtrans report", description="(Re)write the report of an ablation output dir.")
    p.add_argument("out", help="output directory of `memtrans ablate` (holds plan.json and runs/)")
    p.add_argument("--min-bucket-tokens", type=int, default=MIN_BUCKET_TOKENS,
                   help="tokens a document-position bucket needs to count as the far-position bucket")
    args = p.parse_args(argv)
    print(write_report(args.out, args.min_bucket_tokens))
    return 0
