"""PNG plots of an eval result (matplotlib, Agg backend): metrics by position bucket, gate and memory share
per head, retrieval-distance histogram, recall accuracy by distance."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    from memtrans.utils import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return path


def _edge_label(n: int | None) -> str:
    if n is None:
        return "inf"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_by_position(result: dict, path: Path) -> Path:
    rows = result["by_position"]
    labels = [r["bucket"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key in zip(axes, ("ppl", "bpb", "acc")):
        vals = [r[key] if r[key] is not None else float("nan") for r in rows]
        ax.bar(range(len(rows)), vals, color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=30)
        ax.set_title(f"{key} by target position")
        for i, r in enumerate(rows):
            ax.annotate(f"n={r['tokens']}", (i, 0), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"split {result['split']}")
    return _save(fig, path)


def plot_gates(result: dict, path: Path) -> Path | None:
    diag = result["diagnostics"]
    layers = sorted(set(diag["memory_share_per_head"]) | set(diag["gates"]), key=int)
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        share = diag["memory_share_per_head"].get(layer) or []
        gate = diag["gates"].get(layer)
        x = range(len(share))
        ax.bar([i - 0.2 for i in x], share, width=0.4, label="share from memory")
        if gate:
            ax.bar([i + 0.2 for i in range(len(gate))], gate, width=0.4, label="gate")
        ax.set_xlabel("head")
        ax.set_ylim(0, 1)
        ax.set_title(f"memory layer {layer}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_retrieval(result: dict, path: Path) -> Path | None:
    dist = result["diagnostics"]["retrieval_distance"]
    if not dist:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for layer, d in sorted(dist.items(), key=lambda kv: int(kv[0])):
        counts = d["counts"]
        total = max(sum(counts), 1)
        ax.plot(range(len(counts)), [c / total for c in counts], marker="o", label=f"layer {layer}")
        edges = d["edges"]
    ax.set_xticks(range(len(edges)), [_edge_label(e) for e in edges], rotation=90, fontsize=7)
    ax.set_xlabel("distance back to retrieved entry (tokens, bin lower edge)")
    ax.set_ylabel("fraction of retrievals")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_recall(result: dict, path: Path) -> Path | None:
    rc = result.get("recall")
    if not rc or not rc["by_distance"]:
        return None
    rows = rc["by_distance"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(rows)), [r["acc"] for r in rows], color="tab:green")
    ax.set_xticks(range(len(rows)), [f"{_edge_label(r['lo'])}-{_edge_label(r['hi'])}" for r in rows], rotation=30)
    if rc.get("chance") is not None:
        ax.axhline(rc["chance"], color="red", linestyle="--", label="chance")
        ax.legend(fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("distance to binding (tokens)")
    ax.set_title(f"recall accuracy (overall {rc['acc']:.3f})")
    return _save(fig, path)


def make_plots(result: dict, out_dir: str | Path, suffix: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    made = [plot_by_position(result, out_dir / f"by_position{suffix}.png"),
            plot_gates(result, out_dir / f"memory_gates{suffix}.png"),
            plot_retrieval(result, out_dir / f"retrieval_distance{suffix}.png"),
            plot_recall(result, out_dir / f"recall_by_distance{suffix}.png")]
    return [p for p in made if p is not None]
