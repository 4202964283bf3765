"""How much pretraining does the memory need before it pays on real text?

For each pretraining budget (tokens, 4x apart), the paper's fine-tuning recipe through `memtrans ablate`: per seed,
a no-memory model is pretrained for the budget, then a memory copy (the plan's baseline) and a no-memory copy are
fine-tuned from it (the plan's "Memory Ablation" study at the `small` preset). The memory's gain is
no-memory minus memory, per seed (the two copies of one seed share the pretrain and the data order), with a 95%
paired t-interval over the seeds, in far-position perplexity and bits per byte and in overall bits per byte.

    python scripts/scale_study.py --corpus stdlib-code --budgets 0.6M:3,2.5M:3,10M:3,40M:1 --jobs 2
    python scripts/scale_study.py --report-only            # tables and plot from what has finished

Each budget is one `memtrans ablate` output directory (OUT/<budget>); re-running skips finished runs, so the
study continues across sittings (and machines: the dtypes are pinned to fp32). Writes OUT/SCALE.md (the table) and OUT/gain.png.
"""
from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "plans" / "memorizing_transformers.yaml"
PRESET = "small"
STUDY = "Memory Ablation"
# fp32 pinned (not `auto`): the resolved dtypes name the runs, so a study continued on another kind of CPU keeps
# its finished runs; fp32 is fast everywhere, bf16 only on some CPUs
PINNED = ["train.precision=fp32", "model.memory_dtype=float32", "model.score_dtype=float32"]


def parse_budgets(text: str) -> list[tuple[int, int | None]]:
    """'0.6M:3,2.5M' -> [(600000, 3), (2500000, None)] (None: the --seeds default)."""
    out = []
    for item in text.split(","):
        tokens, _, seeds = item.strip().partition(":")
        scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(tokens[-1:].upper(), 1)
        try:
            n = int(float(tokens[:-1] if scale != 1 else tokens) * scale)
            s = int(seeds) if seeds else None
        except ValueError:
            raise SystemExit(f"--budgets: {item!r} is not TOKENS[:SEEDS] (e.g. 2.5M:3)")
        if n <= 0 or (s is not None and s < 1):
            raise SystemExit(f"--budgets: {item!r}: tokens and seeds must be positive")
        out.append((n, s))
    return out


def label(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 1e6 else f"{tokens / 1e3:g}K"


def tokens_per_step(overrides: list[str]) -> int:
    """Training tokens per step of the preset's runs (batch x segment), after --set overrides."""
    from memtrans.ablation.plan import load_plan, resolve
    from memtrans.config import parse_override
    extra = {".".join(keys): value for keys, value in map(parse_override, overrides)}
    resolved = resolve(load_plan(PLAN), PRESET, seeds=[0], only=[STUDY], extra_overrides=extra)
    cfg = next(iter(resolved.runs.values())).config
    return cfg["data"]["batch_size"] * cfg["model"]["segment_len"]


def run_budget(out: Path, tokens: int, seeds: int, steps: int, sets: list[str], jobs: int) -> int:
    cmd = [sys.executable, "-m", "memtrans", "ablate", str(PLAN), "--preset", PRESET, "--only", STUDY,
           "--pretrain-steps", str(steps), "--seeds", str(seeds), "--out", str(out), "--jobs", str(jobs)]
    for s in sets:
        cmd += ["--set", s]
    print(f"\n== pretraining budget {label(tokens)} tokens ({steps} steps), {seeds} seeds -> {out}", flush=True)
    print("   " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def read_rows(out: Path) -> list[dict]:
    path = out / "results.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r["status"] == "finished"]


def _float(x: str | None) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def metrics_of(row: dict) -> dict[str, float | None]:
    far = row.get("far_bucket") or ""
    return {"far_ppl": _float(row.get("far_ppl")), "far_bpb": _float(row.get(f"eval.by_position.{far}.bpb")),
            "bpb": _float(row.get("eval.bpb")), "far": far}


def gains(rows: list[dict]) -> dict:
    """Per metric: memory and no-memory values per seed, and the paired gain (no memory - memory)."""
    from memtrans.ablation.report import describe, paired
    mem = {int(r["seed"]): metrics_of(r) for r in rows if r["variant"] == "baseline"}
    nomem = {int(r["seed"]): metrics_of(r) for r in rows if r["variant"] == "no memory"}
    seeds = sorted(set(mem) & set(nomem))
    out = {"seeds": seeds, "far": sorted({mem[s]["far"] for s in seeds})}
    for m in ("far_ppl", "far_bpb", "bpb"):
        a = [(s, mem[s][m]) for s in seeds]
        b = [(s, nomem[s][m]) for s in seeds]
        one = [y - x for (_, x), (_, y) in zip(a, b) if x is not None and y is not None]
        out[m] = {"memory": describe([x for _, x in a if x is not None]),
                  "no_memory": describe([x for _, x in b if x is not None]),
                  "gain": paired(b, a),  # no memory - memory: positive when the memory helps
                  "single": one[0] if len(one) == 1 else None}
    return out
    return out


def cell(stat) -> str:
    return "-" if stat is None else f"{stat.mean:.4f}"


def gain_cell(d, single: float | None = None) -> str:
    if d is None:
        return f"{single:+.4f} (one seed: no interval)" if single is not None else "-"
    verdict = "memory better" if d.lo > 0 else "memory worse" if d.hi < 0 else "not resolved"
    return f"{d.diff:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}] {verdict}"


def write_summary(out: Path, budgets: list[tuple[int, int | None]]) -> str:
    from memtrans.utils import atomic_write_text
    rows, points = [], []
    for tokens, _ in budgets:
        g = gains(read_rows(out / label(tokens)))
        if not g["seeds"]:
            rows.append(f"| {label(tokens)} | 0 | - | - | - | - | - | not run yet |")
            continue
        rows.append(f"| {label(tokens)} | {len(g['seeds'])} | {', '.join(g['far'])} | {cell(g['far_ppl']['memory'])} | "
                    f"{cell(g['far_ppl']['no_memory'])} | {gain_cell(g['far_ppl']['gain'], g['far_ppl']['single'])} | "
                    f"{gain_cell(g['far_bpb']['gain'], g['far_bpb']['single'])} | "
                    f"{gain_cell(g['bpb']['gain'], g['bpb']['single'])} |")
        points.append((tokens, g))
    text = "\n".join([
        "# Memory gain against pretraining budget",
        "",
        f"`python scripts/scale_study.py` (plan {PLAN.name}, preset `{PRESET}`, study \"{STUDY}\"). Gain = no memory -",
        "memory (positive: the memory helps), mean over seeds and 95% paired t-interval; \"resolved\" only when",
        "the interval excludes 0.",
        "",
        "| pretraining tokens | seeds | far bucket | far ppl, memory | far ppl, no memory | far-ppl gain | "
        "far-bpb gain | overall bpb gain |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    atomic_write_text(out / "SCALE.md", text)
    if points:
        plot(out / "gain.png", points)
    return text


def plot(path: Path, points: list[tuple[int, dict]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (m, name) in zip(axes, (("far_ppl", "far-position perplexity"), ("far_bpb", "far-position bits per byte"))):
        xs, ys, lo, hi, one = [], [], [], [], []
        for tokens, g in points:
            d = g[m]["gain"]
            if d is not None:
                xs.append(tokens), ys.append(d.diff), lo.append(d.diff - d.lo), hi.append(d.hi - d.diff)
            elif g[m]["single"] is not None:
                one.append((tokens, g[m]["single"]))
        ax.axhline(0, color="grey", lw=0.8)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label="mean over seeds, 95% paired CI")
        if one:  # a budget with one seed so far: its difference, without an interval
            ax.plot(*zip(*one), marker="o", mfc="none", ls="none", color="C0", label="one seed (no interval)")
        if xs or one:
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("pretraining tokens (no memory)")
        ax.set_ylabel(f"gain in {name}\n(no memory - memory; 95% paired CI)")
    fig.suptitle("What the kNN memory gains after fine-tuning, by pretraining budget")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="stdlib-code", help="data.corpus of every run (default stdlib-code)")
    p.add_argument("--budgets", default="0.6M,2.5M,10M",
                   help="pretraining budgets in tokens, each optionally :SEEDS (default 0.6M,2.5M,10M)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of a budget without :SEEDS (default 3)")
    p.add_argument("--out", default=str(ROOT / "results" / "memory-scale"))
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (memtrans ablate --jobs)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="further overrides of every run")
    p.add_argument("--report-only", action="store_true", help="only write SCALE.md and gain.png")
    args = p.parse_args(argv)
    budgets = parse_budgets(args.budgets)
    out = Path(args.out)
    sets = [f"data.corpus={args.corpus}", *PINNED, *args.sets]
    failed = 0
    if not args.report_only:
        per_step = tokens_per_step(sets)
        for tokens, seeds in budgets:
            steps = max(1, round(tokens / per_step))
            failed += run_budget(out / label(tokens), tokens, seeds or args.seeds, steps, sets, args.jobs) != 0
    print("\n" + write_summary(out, budgets))
    print(f"wrote {out / 'SCALE.md'} and {out / 'gain.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
