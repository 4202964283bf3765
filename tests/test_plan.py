"""Plan files: the real plan encodes ablation-plan.md for every preset; invalid plans fail with file + path."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memtrans.ablation.plan import PlanError, load_plan, resolve

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "plans" / "memorizing_transformers.yaml"

# ablation-plan.md, verbatim: study -> (action, replacement names)
EXPECTED = {
    "Memory Ablation": ("REMOVE", []),
    "Gating Mechanism": ("REPLACE", ["fixed 0.5 weight", "learned weighted sum", "concatenation"]),
    "Memory Size": ("REPLACE", ["8K", "32K", "131K", "262K"]),
    "Key/Query Normalization": ("REMOVE", []),
    "Layer Position": ("REPLACE", ["bottom layer", "middle layer", "top layer", "multiple layers"]),
}


def test_real_plan_has_the_five_studies():
    plan = load_plan(PLAN)
    assert [s.name for s in plan.studies] == list(EXPECTED)
    for s in plan.studies:
        action, names = EXPECTED[s.name]
        assert s.action == action
        if action == "REPLACE":
            assert [v.name for v in s.variants] == names
        else:
            assert len(s.variants) == 1
        assert {"perplexity", "accuracy"} <= set(s.metrics)
    assert "training stability" in plan.studies[3].metrics
    assert plan.base["model.gate"] == "learned_scalar" and plan.base["model.qk_norm"] is True
    assert plan.base["model.memory_layers"] == "near_top" and plan.base["model.knn_k"] == 32
    assert set(plan.presets) == {"ci", "demo", "small", "recall", "paper", "gpu"}


SHIPPED_PRESETS = ["ci", "demo", "small", "recall", "paper", "gpu"]


@pytest.mark.parametrize("preset", SHIPPED_PRESETS)
def test_every_preset_resolves_every_variant_distinctly_or_declares_it_identical(preset):
    """No shipped preset silently reduces a study to copies: every variant's runs differ from the baseline's and
    every other variant's, except those the preset lists in expect_identical, which are marked identical."""
    plan = load_plan(PLAN)
    assert set(plan.presets) == set(SHIPPED_PRESETS)
    r = resolve(plan, preset, seeds=[0, 1])
    by_study = {s.name: vs for s, vs in r.studies}
    assert list(by_study) == list(EXPECTED)
    for name, vs in by_study.items():
        assert vs[0].baseline and vs[0].name == "baseline"
        assert len(vs) == 1 + max(1, len(EXPECTED[name][1]))
    expected_same = set(plan.presets[preset].expect_identical)
    seen: dict[tuple, str] = {}
    for study, vs in r.studies:
        for v in vs:
            label = "baseline" if v.baseline else f"{study.name}: {v.name}"
            if label in expected_same:
                assert tuple(v.runs) in seen and v.identical_to == seen[tuple(v.runs)], label
                assert v.identity() == f"identical to {seen[tuple(v.runs)]} at depth {v.depth}"
            elif not v.baseline:
                assert v.identical_to is None and tuple(v.runs) not in seen, (label, v.identical_to)
            seen.setdefault(tuple(v.runs), label)
    # 1 baseline + 1 + 3 + 4 + 1 + 4 variants, none collapsing into another except the declared ones
    assert len(r.runs) == 2 * (14 - len(expected_same))
    sizes = {v.name: (v.memory_size_nominal, v.memory_size) for v in by_study["Memory Size"]}
    scale = plan.presets[preset].memory_size_scale
    for name, nominal in [("baseline", 65536), ("8K", 8192), ("32K", 32768), ("131K", 131072), ("262K", 262144)]:
        assert sizes[name] == (nominal, round(nominal * scale))
    layers = {v.name: v.memory_layers for v in by_study["Layer Position"]}
    depth = r.base_config["model"]["depth"]
    assert layers["top layer"] == [depth - 1]
    assert by_study["Memory Ablation"][1].memory_layers == []
    if preset != "recall":
        assert not expected_same and len(layers["multiple layers"]) == 2
        assert len({tuple(x) for x in layers.values()}) == 5
    else:  # depth 2, memory in the bottom layer: bottom = middle = the baseline's layer 0
        assert expected_same == {"Layer Position: bottom layer", "Layer Position: middle layer"}
        assert layers == {"baseline": [0], "bottom layer": [0], "middle layer": [0], "top layer": [1],
                          "multiple layers": [0, 1]}


def test_a_preset_cannot_silently_reduce_a_study_to_copies(tmp_path):
    plan = load_plan(PLAN)
    with pytest.raises(PlanError) as e:  # ci at depth 2: the layer words collapse
        resolve(plan, "ci", extra_overrides={"model.depth": 2})
    msg = str(e.value)
    assert msg.startswith(f"{PLAN}: presets.ci: the study would compare runs with themselves"), msg
    assert "Layer Position: middle layer is identical to Layer Position: bottom layer at depth 2" in msg
    assert "Layer Position: top layer is identical to baseline at depth 2" in msg and "presets.ci.expect_identical" in msg
    # a listed variant that is not identical is an error too (the list stays true)
    path = _write(tmp_path, _set(["presets", "demo", "expect_identical"], ["Layer Position: top layer"]))
    with pytest.raises(PlanError, match=r"presets.demo.expect_identical: Layer Position: top layer differ from every"):
        resolve(load_plan(path), "demo")
    path = _write(tmp_path, _set(["presets", "demo", "expect_identical"], ["Layer Position: attic"]))
    with pytest.raises(PlanError, match=r"presets.demo.expect_identical\[0\]: no variant 'Layer Position: attic'"):
        load_plan(path)


def test_demo_preset_scale():
    r = resolve(load_plan(PLAN), "demo")
    sizes = [v.memory_size for s, vs in r.studies if s.name == "Memory Size" for v in vs]
    assert sizes == [1024, 128, 512, 2048, 4096]
    cfg = next(iter(r.runs.values())).config
    assert (cfg["model"]["depth"], cfg["model"]["dim"], cfg["model"]["heads"], cfg["model"]["segment_len"]) == (4, 128, 4, 128)


def test_identical_variants_share_one_run(tmp_path):
    raw = yaml.safe_load(PLAN.read_text())
    raw["studies"][1]["replacements"].append({"name": "same as base", "overrides": {"model.gate": "learned_scalar"}})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PlanError, match="Gating Mechanism: same as base is identical to baseline at depth 4"):
        resolve(load_plan(path), "ci", seeds=[0, 1])
    raw["presets"]["ci"]["expect_identical"] = ["Gating Mechanism: same as base"]
    path.write_text(yaml.safe_dump(raw))
    r = resolve(load_plan(path), "ci", seeds=[0, 1])
    assert len(r.runs) == 28
    shared = [spec for spec in r.runs.values() if len(spec.members) > 1]
    assert len(shared) == 2 and all(("Gating Mechanism", "same as base") in s.members for s in shared)
    same = next(v for s, vs in r.studies for v in vs if v.name == "same as base")
    assert same.identity() == "identical to baseline at depth 4"


def _write(tmp_path, mutate) -> Path:
    raw = yaml.safe_load(PLAN.read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _set(path, value):
    def mutate(raw):
        node = raw
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


BAD = [
    ("unknown plan field", _set(["seedz"], 3), "seedz", "allowed: name, description"),
    ("unknown study field", _set(["studies", 0, "kind"], "x"), "studies[0].kind", "allowed: name, ablated, action"),
    ("unknown action", _set(["studies", 1, "action"], "SWAP"), "studies[1].action", "allowed: REMOVE, REPLACE"),
    ("unknown replacement key", _set(["studies", 2, "replacements", 1, "value"], 1),
     "studies[2].replacements[1].value", "allowed: name, overrides"),
    ("unknown config key", _set(["studies", 2, "replacements", 1, "overrides"], {"model.gatee": "fixed"}),
     "studies[2].replacements[1].overrides.model.gatee", "allowed: vocab_size, dim"),
    ("unknown config section", _set(["base", "modle.gate"], "fixed"), "base.modle.gate", "allowed: model, data"),
    ("bad config value", _set(["studies", 1, "replacements", 0, "overrides"], {"model.gate": "sigmoid"}),
     "studies[1].replacements[0].overrides", "choose one of learned_scalar, fixed"),
    ("bad config type", _set(["studies", 2, "replacements", 0, "overrides"], {"model.memory_size": "big"}),
     "studies[2].replacements[0].overrides", "expected an integer"),
    ("empty study", _set(["studies", 4, "replacements"], []), "studies[4].replacements", "non-empty list"),
    ("REMOVE with replacements", _set(["studies", 0, "replacements"], [{"name": "x", "overrides": {"model.qk_norm": False}}]),
     "studies[0].replacements", "REMOVE study takes no replacements"),
    ("unknown metric", _set(["studies", 0, "metrics"], ["perplexity", "vibes"]), "studies[0].metrics[1]",
     "allowed: perplexity"),
    ("bad scale", _set(["presets", "demo", "memory_size_scale"], "-1/2"), "presets.demo.memory_size_scale",
     "positive number"),
]


@pytest.mark.parametrize("case,mutate,where,allowed", BAD, ids=[b[0] for b in BAD])
def test_invalid_plans_name_file_path_and_allowed(tmp_path, case, mutate, where, allowed):
    path = _write(tmp_path, mutate)
    with pytest.raises(PlanError) as e:
        load_plan(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {where}: "), msg
    assert allowed in msg, msg


def test_unknown_preset_lists_presets():
    with pytest.raises(PlanError, match=r"memorizing_transformers.yaml: presets: unknown preset 'huge'; "
                                        r"allowed: ci, demo, small, recall, paper"):
        resolve(load_plan(PLAN), "huge")


def test_preset_values_are_checked_per_preset(tmp_path):
    path = _write(tmp_path, _set(["presets", "ci", "memory_size_scale"], "1/1024"))  # 8K -> 8 < knn_k 32
    plan = load_plan(path)
    with pytest.raises(PlanError, match=r"presets.ci \+ studies\[2\].replacements\[0\].overrides: .*knn_k"):
        resolve(plan, "ci")
    resolve(plan, "demo")


@pytest.mark.parametrize("dotted, bad, allowed", [
    ("train.precision", "fp99", "auto, bf16, fp16, fp32"), ("train.device", "tpu", "auto, cpu, cuda"),
    ("optim.optimizer", "sgd", "adamw, adafactor"), ("optim.schedule", "linear", "cosine, rsqrt, constant"),
    ("data.tokenizer", "wordpiece", "byte, bpe"), ("model.gate", "sigmoid", "learned_scalar, fixed"),
    ("data.recall_layout", "scattered", "text, fused"), ("model.memory_backend", "hnsw", "exact, faiss_flat"),
    ("data.corpus", "wiki", "recall, stdlib-code"), ("model.score_dtype", "fp8", "auto, float32, bfloat16")])
def test_bad_enumerated_values_fail_at_resolve_with_file_path_and_allowed(tmp_path, dotted, bad, allowed):
    """On the command line (--set) and in a preset, before any run starts."""
    with pytest.raises(PlanError) as e:
        resolve(load_plan(PLAN), "ci", extra_overrides={dotted: bad})
    msg = str(e.value)
    section, key = dotted.split(".")
    assert msg.startswith(f"{PLAN}: command-line overrides (--set {dotted}={bad}): {section}: {key}: "), msg
    assert allowed in msg, msg
    path = _write(tmp_path, lambda raw: raw["presets"]["demo"]["overrides"].update({dotted: bad}))
    with pytest.raises(PlanError) as e:
        resolve(load_plan(path), "demo")
    assert str(e.value).startswith(f"{path}: presets.demo.overrides: {section}: {key}: ") and allowed in str(e.value)


def test_recall_queries_within_the_models_local_reach_are_rejected():
    """A recall study at a depth/segment whose local attention reaches the bindings would not measure the memory."""
    plan = load_plan(PLAN)
    resolve(plan, "recall", seeds=[0])  # depth 2, segment 32: reach 95; the closest query lies 102 tokens back
    resolve(plan, "ci", seeds=[0])  # depth 4, segment 32: reach 159; closest 176
    with pytest.raises(PlanError) as e:
        resolve(plan, "ci", seeds=[0], extra_overrides={"model.segment_len": 64})  # reach 319
    msg = str(e.value)
    assert msg.startswith(f"{PLAN}: presets.ci (baseline): data.recall_min_distance=160 lets a query lie 176 tokens"), msg
    assert "local reach of 319 tokens (model.segment_len 64 x (model.depth 4 + 1) - 1, XL cache)" in msg
    assert "data.recall_min_distance >= 305" in msg
