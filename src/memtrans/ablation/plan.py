"""Ablation plans: YAML -> validated studies -> the deduplicated list of runs for one preset.

A plan file (see plans/memorizing_transformers.yaml) holds:

    name, description, source          free text
    base:     {dotted.config.key: value}   the paper's defaults every run starts from
    metrics:  [perplexity, accuracy]       default metrics of every study
    seeds:    3 | [0, 1, 2]
    studies:  - name, ablated, action: REMOVE, overrides: {...}, [variant: label], [metrics]
              - name, ablated, action: REPLACE, replacements: [{name, overrides}], [metrics]
    presets:  {name: {description, overrides, memory_size_scale, seeds, est_flops_per_s, pretrain_overrides}}

A preset scales the plan to a budget without changing its meaning: its overrides apply on top of
`base`, and every `model.memory_size` (the plan's values are nominal, i.e. the paper's) is multiplied
by `memory_size_scale`. Every resolved run config is built with `config_from_dict`, so a bad key or
value fails here, before any run starts, with the plan file and the path inside it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from memtrans.config import Config, apply_overrides, config_from_dict
from memtrans.data.recall import check_beyond_local_reach
from memtrans.device import resolve_config

ACTIONS = ("REMOVE", "REPLACE")
METRICS = ("perplexity", "bits per byte", "accuracy", "far-position perplexity", "recall accuracy",
           "training stability", "tokens per second")
PLAN_KEYS = ("name", "description", "source", "base", "metrics", "seeds", "studies", "presets")
STUDY_KEYS = ("name", "ablated", "action", "overrides", "variant", "replacements", "metrics")
REPLACEMENT_KEYS = ("name", "overrides")
PRESET_KEYS = ("description", "overrides", "memory_size_scale", "seeds", "est_flops_per_s", "pretrain_overrides",
               "expect_identical")
BASELINE = "baseline"
DEFAULT_FLOPS_PER_S = 1e11  # dry-run time estimate only; a preset states its own
TOPK_FLOP_EQUIV = 100  # top-k selection cost per retrieval score, in flop-equivalents


class PlanError(ValueError):
    """A plan problem: `file: path.inside.plan: what is wrong; allowed: ...`."""

    def __init__(self, file: str | Path, where: str, problem: str):
        self.file, self.where, self.problem = str(file), where, problem
        super().__init__(f"{file}: {where}: {problem}" if where else f"{file}: {problem}")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, nominal (unscaled) memory sizes
    where: str  # path inside the plan file, for error messages


@dataclass
class Study:
    name: str
    ablated: str
    action: str
    variants: list[Variant]
    metrics: list[str]


@dataclass
class Preset:
    name: str
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    memory_size_scale: Fraction = Fraction(1)
    seeds: list[int] | None = None
    est_flops_per_s: float = DEFAULT_FLOPS_PER_S
    # applied only to the no-memory pretrain of `ablate --pretrain-steps` (e.g. shorter documents, so the
    # pretrain learns a lookup locally that the memory variants then extend)
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    # "Study: variant" labels that resolve to the same configuration as the baseline or another variant at this
    # preset (e.g. layer words at a small depth): reported as identical, never compared. Any other identical
    # variant is an error, so a preset cannot silently reduce a study to copies.
    expect_identical: list[str] = field(default_factory=list)


@dataclass
class Plan:
    path: Path
    name: str
    description: str
    source: str
    base: dict[str, Any]
    metrics: list[str]
    seeds: list[int]
    studies: list[Study]
    presets: dict[str, Preset]


# ----------------------------------------------------------------------------------------- loading

def _config_key_error(dotted: str) -> str | None:
    """None if `dotted` names a Config field, else the problem with the allowed keys at that level."""
    node: Any = Config()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return f"{'.'.join(parts[:i])} is a value, not a section"
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            return f"unknown config key {part!r}; allowed: {', '.join(names)}"
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        return f"{dotted} is a section; name a key inside it: {', '.join(f.name for f in dataclasses.fields(node))}"
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'gate': 'fixed'}} and {'model.gate': 'fixed'} both -> {'model.gate': 'fixed'}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class _Reader:
    """Typed access to the parsed YAML with errors that name the file and the path inside it."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, problem: str) -> PlanError:
        return PlanError(self.file, where, problem)

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping with keys {', '.join(allowed)}, got {value!r}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{where}.{key}" if where else str(key),
                                f"unknown field {key!r}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing required field {key!r}")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value.strip()

    def overrides(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping of dotted config keys (e.g. model.gate: fixed), got {value!r}")
        flat = _flatten(value)
        for key in flat:
            problem = _config_key_error(key)
            if problem:
                raise self.fail(f"{where}.{key}", problem)
        return flat

    def seeds(self, value: Any, where: str) -> list[int]:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int) and value >= 1:
            return list(range(value))
        elif isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            if len(set(value)) != len(value):
                raise self.fail(where, f"seeds repeat: {value}")
            return list(value)
        raise self.fail(where, f"expected a positive count or a non-empty list of integer seeds, got {value!r}")

    def labels(self, value: Any, where: str, studies: list[Study]) -> list[str]:
        """A list of "Study: variant" labels naming variants of the plan."""
        known = [f"{s.name}: {v.name}" for s in studies for v in s.variants]
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list of 'Study: variant' labels, got {value!r}")
        for i, label in enumerate(value):
            if label not in known:
                raise self.fail(f"{where}[{i}]", f"no variant {label!r}; allowed: {', '.join(known)}")
        return list(value)

    def metrics(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list; allowed: {', '.join(METRICS)}")
        for i, m in enumerate(value):
            if m not in METRICS:
                raise self.fail(f"{where}[{i}]", f"unknown metric {m!r}; allowed: {', '.join(METRICS)}")
        return list(value)

    def scale(self, value: Any, where: str) -> Fraction:
        try:
            if isinstance(value, bool):
                raise ValueError
            frac = Fraction(str(value).replace(" ", "")).limit_denominator(1 << 20)
        except (ValueError, ZeroDivisionError):
            frac = Fraction(0)
        if frac <= 0:
            raise self.fail(where, f"expected a positive number or fraction such as 1/64, got {value!r}")
        return frac


def load_plan(path: str | Path) -> Plan:
    """Parse and validate a plan file (structure, config keys and every variant's config values)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(path, "", "plan file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlanError(path, "", f"not valid YAML: {e}") from None
    r = _Reader(path)
    top = r.mapping(raw, "", PLAN_KEYS, required=("base", "studies"))
    metrics = r.metrics(top.get("metrics", ["perplexity", "accuracy"]), "metrics")
    plan = Plan(
        path=path,
        name=r.text(top.get("name", path.stem), "name"),
        description=str(top.get("description", "")).strip(),
        source=str(top.get("source", "")).strip(),
        base=r.overrides(top["base"], "base"),
        metrics=metrics,
        seeds=r.seeds(top.get("seeds", 1), "seeds"),
        studies=[],
        presets={},
    )
    studies = top["studies"]
    if not isinstance(studies, list) or not studies:
        raise r.fail("studies", "expected a non-empty list of studies")
    for i, s in enumerate(studies):
        plan.studies.append(_load_study(r, s, f"studies[{i}]", metrics))
    names = [s.name for s in plan.studies]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise r.fail(f"studies[{i}].name", f"study name {n!r} is used twice")
    presets = top.get("presets") or {}
    if not isinstance(presets, dict):
        raise r.fail("presets", f"expected a mapping of preset name -> settings, got {presets!r}")
    for name, p in presets.items():
        where = f"presets.{name}"
        p = r.mapping(p, where, PRESET_KEYS)
        plan.presets[str(name)] = Preset(
            name=str(name),
            description=str(p.get("description", "")).strip(),
            overrides=r.overrides(p.get("overrides"), f"{where}.overrides"),
            memory_size_scale=r.scale(p.get("memory_size_scale", 1), f"{where}.memory_size_scale"),
            seeds=r.seeds(p["seeds"], f"{where}.seeds") if "seeds" in p else None,
            est_flops_per_s=float(p.get("est_flops_per_s", DEFAULT_FLOPS_PER_S)),
            pretrain_overrides=r.overrides(p.get("pretrain_overrides"), f"{where}.pretrain_overrides"),
            expect_identical=r.labels(p.get("expect_identical", []), f"{where}.expect_identical", plan.studies),
        )
    # Values: every variant on the plain base must build (a preset's own problems surface in resolve()).
    _build(plan.path, "base", _nest(plan.base))
    for study in plan.studies:
        for v in study.variants:
            _build(plan.path, v.where, apply_overrides(_nest(plan.base), v.overrides))
    return plan


def _load_study(r: _Reader, s: Any, where: str, default_metrics: list[str]) -> Study:
    s = r.mapping(s, where, STUDY_KEYS, required=("name", "action"))
    name = r.text(s["name"], f"{where}.name")
    action = s["action"]
    if action not in ACTIONS:
        raise r.fail(f"{where}.action", f"unknown action {action!r}; allowed: {', '.join(ACTIONS)}")
    metrics = r.metrics(s["metrics"], f"{where}.metrics") if "metrics" in s else list(default_metrics)
    variants: list[Variant] = []
    if action == "REMOVE":
        if "replacements" in s:
            raise r.fail(f"{where}.replacements",
                         "a REMOVE study takes no replacements; give its `overrides` (or use action: REPLACE)")
        overrides = r.overrides(s.get("overrides"), f"{where}.overrides")
        if not overrides:
            raise r.fail(f"{where}.overrides", "a REMOVE study needs overrides saying how the part is removed "
                                               "(e.g. model.memory_layers: [])")
        variants.append(Variant(str(s.get("variant", "removed")), overrides, f"{where}.overrides"))
    else:
        for key in ("overrides", "variant"):
            if key in s:
                raise r.fail(f"{where}.{key}", f"a REPLACE study lists its variants under `replacements`, not `{key}`")
        reps = s.get("replacements")
        if not isinstance(reps, list) or not reps:
            raise r.fail(f"{where}.replacements", "a REPLACE study needs a non-empty list of replacements")
        for j, rep in enumerate(reps):
            rw = f"{where}.replacements[{j}]"
            rep = r.mapping(rep, rw, REPLACEMENT_KEYS, required=REPLACEMENT_KEYS)
            overrides = r.overrides(rep["overrides"], f"{rw}.overrides")
            if not overrides:
                raise r.fail(f"{rw}.overrides", "a replacement needs at least one override")
            variants.append(Variant(r.text(rep["name"], f"{rw}.name"), overrides, f"{rw}.overrides"))
        vnames = [v.name for v in variants]
        for j, n in enumerate(vnames):
            if n == BASELINE or vnames.index(n) != j:
                raise r.fail(f"{where}.replacements[{j}].name", f"replacement name {n!r} is reserved or used twice")
    return Study(name=name, ablated=str(s.get("ablated", "")).strip(), action=action, variants=variants,
                 metrics=metrics)


def _nest(flat: dict[str, Any]) -> dict:
    return apply_overrides({}, flat)


def _build(file: Path, where: str, data: dict) -> Config:
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise PlanError(file, where, str(e)) from None


# --------------------------------------------------------------------------------------- resolving

@dataclass
class RunSpec:
    """One training run: a resolved config (incl. seed), shared by every (study, variant) that yields it."""
    hash: str
    seed: int
    config: dict
    overrides: dict[str, Any]  # the variant's overrides as applied (scaled memory size), for display
    members: list[tuple[str, str]] = field(default_factory=list)  # (study, variant)


@dataclass
class ResolvedVariant:
    name: str
    overrides: dict[str, Any]  # as written in the plan (nominal)
    runs: list[str]  # run hashes, one per seed
    memory_size_nominal: int
    memory_size: int
    memory_layers: list[int]
    baseline: bool = False
    depth: int = 0
    # "baseline" or "Study: variant" whose runs these are (the same resolved configuration); None if distinct
    identical_to: str | None = None

    def identity(self) -> str | None:
        """'identical to baseline at depth 2', or None."""
        return None if self.identical_to is None else f"identical to {self.identical_to} at depth {self.depth}"


@dataclass
class ResolvedPlan:
    plan: Plan
    preset: Preset
    seeds: list[int]
    extra_overrides: dict[str, Any]
    base_config: dict  # plan base + preset + extra overrides, before variants and scaling
    studies: list[tuple[Study, list[ResolvedVariant]]]  # baseline first in each
    runs: dict[str, RunSpec]  # by hash, in execution order (baseline first)

    def record(self) -> dict:
        """The plan record written to OUT/plan.json; the report reads this and the run directories only."""
        p = self.plan
        return {
            "plan": {"name": p.name, "file": str(p.path), "description": p.description, "source": p.source,
                     "base": p.base, "metrics": p.metrics},
            "preset": {"name": self.preset.name, "description": self.preset.description,
                       "overrides": self.preset.overrides,
                       "memory_size_scale": str(self.preset.memory_size_scale),
                       "est_flops_per_s": self.preset.est_flops_per_s,
                       "pretrain_overrides": self.preset.pretrain_overrides,
                       "expect_identical": self.preset.expect_identical},
            "seeds": self.seeds,
            "extra_overrides": self.extra_overrides,
            "base_config": self.base_config,
            "studies": [{"name": s.name, "ablated": s.ablated, "action": s.action, "metrics": s.metrics,
                         "variants": [dataclasses.asdict(v) for v in variants]}
                        for s, variants in self.studies],
            "runs": {h: {"seed": r.seed, "overrides": r.overrides, "members": [list(m) for m in r.members],
                         "estimate": estimate_cost(r.config, self.preset.est_flops_per_s)}
                     for h, r in self.runs.items()},
        }


def scale_memory(nominal: int, scale: Fraction) -> int:
    return max(1, round(nominal * scale))


def resolve(plan: Plan, preset_name: str, seeds: list[int] | None = None, only: list[str] | None = None,
            extra_overrides: dict[str, Any] | None = None) -> ResolvedPlan:
    """Expand `plan` for one preset into variants and deduplicated runs (same config hash = one run)."""
    if preset_name not in plan.presets:
        raise PlanError(plan.path, "presets", f"unknown preset {preset_name!r}; allowed: {', '.join(plan.presets)}")
    preset = plan.presets[preset_name]
    seeds = list(seeds if seeds is not None else preset.seeds if preset.seeds is not None else plan.seeds)
    extra = dict(extra_overrides or {})
    for key in extra:
        problem = _config_key_error(key)
        if problem:
            raise ValueError(f"override {key}: {problem}")
    studies = plan.studies
    if only:
        wanted = {slug(o) for o in only}
        studies = [s for s in plan.studies if slug(s.name) in wanted]
        if len(studies) != len(wanted):
            raise PlanError(plan.path, "studies", f"--only {', '.join(only)}: no such study; allowed: "
                                                  f"{', '.join(s.name for s in plan.studies)}")
    where_preset = f"presets.{preset_name}"
    base = apply_overrides(_nest(plan.base), preset.overrides)
    _build(plan.path, f"{where_preset}.overrides", base)
    if extra:
        base = apply_overrides(base, extra)
        _build(plan.path, "command-line overrides (--set " + " ".join(f"{k}={v}" for k, v in extra.items()) + ")",
               base)
    runs: dict[str, RunSpec] = {}

    def expand(study_name: str, variant: Variant | None) -> ResolvedVariant:
        overrides = variant.overrides if variant else {}
        where = f"{where_preset} + {variant.where}" if variant else f"{where_preset} (baseline)"
        data = apply_overrides(base, overrides)
        nominal = _build(plan.path, where, data).model.memory_size
        scaled = scale_memory(nominal, preset.memory_size_scale)
        data = apply_overrides(data, {"model.memory_size": scaled})
        applied = dict(overrides)
        if "model.memory_size" in applied:
            applied["model.memory_size"] = scaled
        hashes = []
        cfg = None
        for seed in seeds:
            # precision `auto` resolved for this machine, so the hash names what will run (memtrans.device)
            cfg = resolve_config(_build(plan.path, where, apply_overrides(data, {"train.seed": seed})))
            try:  # a recall study whose queries the model reaches locally would not measure the memory
                check_beyond_local_reach(cfg)
            except ValueError as e:
                raise PlanError(plan.path, where, str(e)) from None
            h = cfg.hash()
            spec = runs.setdefault(h, RunSpec(h, seed, cfg.to_dict(), applied))
            spec.members.append((study_name, variant.name if variant else BASELINE))
            hashes.append(h)
        assert cfg is not None
        return ResolvedVariant(name=variant.name if variant else BASELINE, overrides=overrides, runs=hashes,
                               memory_size_nominal=nominal, memory_size=scaled,
                               memory_layers=list(cfg.model.memory_layers), baseline=variant is None,
                               depth=cfg.model.depth)

    if not seeds:
        raise PlanError(plan.path, f"{where_preset}.seeds", "no seeds to run")
    baseline = expand("*", None)
    resolved = [(s, [baseline] + [expand(s.name, v) for v in s.variants]) for s in studies]
    _mark_identical(plan, preset, resolved, extra)
    return ResolvedPlan(plan=plan, preset=preset, seeds=seeds, extra_overrides=extra, base_config=base,
                        studies=resolved, runs=runs)


def _mark_identical(plan: Plan, preset: Preset, studies: list[tuple[Study, list[ResolvedVariant]]],
                    extra: dict[str, Any]) -> None:
    """Set `identical_to` on every variant whose runs (= resolved configurations, per seed) are the baseline's or
    an earlier variant's; a PlanError unless the preset lists exactly those in `expect_identical`."""
    owner: dict[tuple[str, ...], str] = {}
    found: dict[str, ResolvedVariant] = {}
    for study, variants in studies:
        for v in variants:
            label = BASELINE if v.baseline else f"{study.name}: {v.name}"
            key = tuple(v.runs)
            if key in owner and not v.baseline:
                v.identical_to = owner[key]
                found[label] = v
            owner.setdefault(key, label)
    where = f"presets.{preset.name}.expect_identical"
    included = {f"{s.name}: {v.name}" for s, _ in studies for v in s.variants}
    unexpected = [label for label in found if label not in preset.expect_identical]
    if unexpected:
        cause = (f" with the command-line overrides {', '.join(f'{k}={v}' for k, v in extra.items())}"
                 if extra else "")
        raise PlanError(plan.path, f"presets.{preset.name}", "the study would compare runs with themselves" + cause
                        + ": " + "; ".join(f"{label} is {found[label].identity()}" for label in unexpected)
                        + f". Give the preset a depth (or values) at which they differ, or list them under {where} "
                          f"to report them as identical")
    stale = [label for label in preset.expect_identical if label in included and label not in found]
    if stale:
        raise PlanError(plan.path, where, f"{', '.join(stale)} differ from every other variant at this preset; "
                                          f"remove them from the list")


def slug(text: str) -> str:
    """'Key/Query Normalization' -> 'key-query-normalization' (file names, --only matching)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------- estimates

def estimate_cost(config: dict, flops_per_s: float = DEFAULT_FLOPS_PER_S) -> dict:
    """Rough cost of one run: tokens = steps * batch * segment; time from a FLOP count.

    Dense: 6 * params per token (forward + backward) plus local/XL attention. Memory layers add the
    forward-only retrieval scores (2 * memory_size * dim per token) and a top-k pass over them, counted
    as TOPK_FLOP_EQUIV flops per score (~6 ns per score measured on a 2-core CPU at ~2e10 flop/s).
    A guide for planning, not a promise.
    """
    m, d, t = config["model"], config["data"], config["train"]
    tokens = int(t["steps"]) * int(d["batch_size"]) * int(m["segment_len"])
    dim, depth, seg = int(m["dim"]), int(m["depth"]), int(m["segment_len"])
    ffn = int(m["ffn_dim"] or 4 * dim)
    params = depth * (4 * dim * dim + 2 * dim * ffn) + 2 * int(m["vocab_size"]) * dim
    context = seg * (2 if m["xl_cache"] else 1)
    flops = tokens * (6 * params + 6 * depth * context * dim)
    n_mem = len(m["memory_layers"] or [])
    flops += tokens * n_mem * int(m["memory_size"]) * (2 * dim + TOPK_FLOP_EQUIV * int(m["heads"]))
    seconds = flops / flops_per_s + 10.0  # + process start-up and evaluation overhead
    return {"tokens": tokens, "params": params, "seconds": round(seconds, 1)}


def format_seconds(s: float) -> str:
    s = float(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
