"""PNG plots for the ablation report (matplotlib, Agg backend), drawn from run files only.

Which plots a study gets follows from its plan record: training curves always; perplexity against
memory size when its variants only change model.memory_size; against layer position when they only
change model.memory_layers; gate values per head when they change model.gate; gradient-norm traces
when its metrics include training stability.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from memtrans.ablation.plan import slug  # noqa: E402

if TYPE_CHECKING:
    from memtrans.ablation.report import VariantData


def _varied_keys(study: dict) -> set[str]:
    return {k for v in study["variants"] if not v.get("baseline") for k in v["overrides"]}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mean_curve(runs, key: str) -> tuple[list[int], list[float]]:
    """Mean of `key` over runs at each step that at least one run logged."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in r.metrics():
            v = row.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in row:
                by_step[int(row["step"])].append(float(v))
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def training_curves(title: str, variants: list[VariantData], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for v in variants:
        steps, loss = mean_curve([r for r in v.runs if r.trained or r.status == "running"], "loss")
        if steps:
            ax.plot(steps, loss, label=f"{v.label} (n={len(v.runs)})", lw=1.5)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", title=f"{title}: training curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _errorbar_points(variants, key: str, x_of) -> tuple[list, list, list, list]:
    xs, ys, errs, labels = [], [], [], []
    for v in variants:
        s = v.quality.get(key)
        if s is None:
            continue
        xs.append(x_of(v))
        ys.append(s.mean)
        errs.append(0.0 if s.n < 2 else s.hi - s.mean)
        labels.append(v.label)
    return xs, ys, errs, labels


def ppl_vs_memory_size(title: str, variants: list[VariantData], path: Path, scale: str) -> Path | None:
    pts = sorted(zip(*_errorbar_points(variants, "ppl", lambda v: v.info["memory_size"])))
    if not pts:
        return None
    xs, ys, errs, labels = map(list, zip(*pts))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    nominal = {v.label: v.info["memory_size_nominal"] for v in variants}
    ax.set_xticks(xs, [f"{lab}\n{nominal[lab]}\n-> {x}" for x, lab in zip(xs, labels)], fontsize=8)
    ax.set(xlabel=f"memory size per head (nominal -> run; scale {scale})", ylabel="perplexity (95% CI)",
           title=f"{title}: perplexity vs memory size")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def ppl_vs_layer(title: str, variants: list[VariantData], path: Path) -> Path | None:
    ordered = sorted(variants, key=lambda v: (len(v.info["memory_layers"]), v.info["memory_layers"]))
    xs, ys, errs, labels = _errorbar_points(ordered, "ppl", lambda v: v.label)
    if not xs:
        return None
    names = {v.label: v.info["memory_layers"] for v in ordered}
    fig, ax = plt.subplots(figsize=(6, 4))
    pos = list(range(len(xs)))
    ax.errorbar(pos, ys, yerr=errs, marker="o", capsize=4, ls="none")
    ax.set_xticks(pos, [f"{lab}\nlayers {names[lab]}" for lab in labels], fontsize=8)
    ax.set(ylabel="perplexity (95% CI)", title=f"{title}: perplexity vs memory layer (0-based)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def gate_values(title: str, variants: list[VariantData], path: Path) -> Path | None:
    """Mean gate per head (over seeds), one group of bars per (variant, memory layer)."""
    series = []
    for v in variants:
        per_layer: dict[str, list[list[float]]] = defaultdict(list)
        for r in v.runs:
            gates = ((r.eval.get("diagnostics") or {}).get("gates") or {}) if r.ok else {}
            for layer, heads in gates.items():
                if heads:  # None where the gate has no per-head value (e.g. concatenation)
                    per_layer[layer].append([float(g) for g in heads])
        for layer, seeds in sorted(per_layer.items()):
            width = min(len(s) for s in seeds)
            series.append((f"{v.label}, layer {layer}", [sum(s[h] for s in seeds) / len(seeds) for h in range(width)]))
    if not series:
        return None
    heads = max(len(vals) for _, vals in series)
    fig, ax = plt.subplots(figsize=(max(6, heads * 0.8), 4))
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        ax.bar([h + i * w - 0.4 + w / 2 for h in range(len(vals))], vals, width=w, label=label)
    ax.set_xticks(range(heads), [str(h) for h in range(heads)])
    ax.set(xlabel="head", ylabel="gate value (weight on memory)", title=f"{title}: gate values per head", ylim=(0, 1))
    ax.legend(fontsize=7)
    return _save(fig, path)


def grad_norms(title: str, variants: list[VariantData], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, v in enumerate(variants):
        for j, r in enumerate(x for x in v.runs if x.trained or x.status == "running"):
            rows = [m for m in r.metrics() if isinstance(m.get("grad_norm"), (int, float)) and "step" in m]
            if rows:
                ax.plot([m["step"] for m in rows], [m["grad_norm"] for m in rows], color=colors[i % len(colors)],
                        lw=1, alpha=0.8, label=v.label if j == 0 else None)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="gradient norm (before clipping)", title=f"{title}: gradient norms (every seed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def study_plots(study: dict, variants: list[VariantData], plot_dir: Path, scale: str = "1") -> dict[str, Path]:
    """Draw the plots that fit this study; returns {title: path} of those drawn."""
    name, s = study["name"], slug(study["name"])
    keys = _varied_keys(study)
    candidates = [("Training curves", lambda p: training_curves(name, variants, p), f"curves-{s}.png")]
    if keys == {"model.memory_size"}:
        candidates.append(("Perplexity vs memory size",
                           lambda p: ppl_vs_memory_size(name, variants, p, scale), f"ppl-vs-memory-size-{s}.png"))
    if keys == {"model.memory_layers"} and study["action"] == "REPLACE":
        candidates.append(("Perplexity vs layer position", lambda p: ppl_vs_layer(name, variants, p),
                           f"ppl-vs-layer-{s}.png"))
    if "model.gate" in keys:
        candidates.append(("Gate values per head", lambda p: gate_values(name, variants, p), f"gates-{s}.png"))
    if "training stability" in study["metrics"]:
        candidates.append(("Gradient norms", lambda p: grad_norms(name, variants, p), f"grad-norms-{s}.png"))
    made = {}
    for title, draw, fname in candidates:
        path = draw(plot_dir / fname)
        if path is not None:
            made[title] = path
    return made
