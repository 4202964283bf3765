import json
import math
import shutil

import pytest
import torch
import yaml

from memtrans.config import OptimConfig
from memtrans.train import train
from memtrans.train.optim import lr_factor, param_groups
from memtrans.train.stability import StabilityTracker
from memtrans.train.trainer import main as train_main

from _train_helpers import tiny_config, tiny_dict


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_dir(tmp_path):
    run = tmp_path / "run"
    s = train(tiny_config(tmp_path), run, quiet=True)
    for name in ("config.yaml", "status.json", "metrics.jsonl", "summary.json", "checkpoints/latest.pt"):
        assert (run / name).is_file(), name
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 12 and status["error"] is None
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "clipped", "time"):
        assert key in rows[0]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("steps", "tokens", "final_loss", "loss_spikes", "grad_spikes", "clipped_fraction", "diverged",
                "diverged_step", "tokens_per_s", "wall_time_s", "params"):
        assert key in summary
    assert summary["steps"] == 12 and summary["tokens"] == rows[-1]["tokens"] > 0
    assert s["final_loss"] == rows[-1]["loss"]
    # the loss falls on the first steps (byte LM from uniform)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_vocab_size_taken_from_tokenizer(tmp_path):
    cfg = tiny_config(tmp_path, model={"vocab_size": 300})
    s = train(cfg, tmp_path / "run", quiet=True)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 256
    assert any("vocab_size" in n for n in s["notes"])


def test_finished_run_resume_returns_at_once_and_no_resume_refuses(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, steps=3), run, quiet=True)
    before = (run / "metrics.jsonl").read_text()
    train(tiny_config(tmp_path, steps=3), run, resume=True, quiet=True)
    assert (run / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tmp_path, steps=3), run, resume=False, quiet=True)


def test_budget_tokens_stops_early(tmp_path):
    s = train(tiny_config(tmp_path, steps=50, train={"budget_tokens": 100}), tmp_path / "run", quiet=True)
    assert s["status"] == "finished" and s["steps"] < 50 and "budget_tokens" in s["budget_hit"]
    assert s["tokens"] >= 100


def test_divergence_ends_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, steps=30, optim={"lr": 1e6, "grad_clip": 0.0, "warmup_steps": 0})
    run = tmp_path / "run"
    s = train(cfg, run, quiet=True)
    assert s["status"] == "diverged" and s["diverged"] and s["diverged_step"] is not None
    assert json.loads((run / "status.json").read_text())["status"] == "diverged"
    assert json.loads((run / "summary.json").read_text())["diverged_step"] == s["diverged_step"]
    # the CLI exits 0 on a diverged run, and --resume then returns at once
    (run.parent / "c.yaml").write_text(yaml.safe_dump(yaml.safe_load((run / "config.yaml").read_text())))
    assert train_main(["--config", str(run.parent / "c.yaml"), "--run-dir", str(run), "--resume", "--quiet"]) == 0


def test_failure_sets_status_failed(tmp_path):
    run = tmp_path / "run"

    def boom(step):
        if step == 2:
            raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        train(tiny_config(tmp_path), run, quiet=True, on_step=boom)
    st = json.loads((run / "status.json").read_text())
    assert st["status"] == "failed" and "disk on fire" in st["error"]


def test_cli_bad_config_exits_2(tmp_path, capsys):
    from memtrans.cli import main
    (tmp_path / "c.yaml").write_text("model: {gate: nope}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "gate" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_init_from_keeps_new_memory_params_fresh(tmp_path):
    base = tmp_path / "base"
    train(tiny_config(tmp_path, memory=False, steps=3), base, quiet=True)
    cfg = tiny_config(tmp_path, memory=True, steps=2, train={"init_from": str(base)})
    s = train(cfg, tmp_path / "ft", quiet=True)
    assert s["init_from"]["missing"] == ["blocks.1.attn.gate_bias"]
    assert s["init_from"]["unexpected"] == []
    bad = tiny_config(tmp_path, memory=True, steps=2, model={"dim": 64, "head_dim": 32},
                      train={"init_from": str(base / "checkpoints" / "latest.pt")})
    with pytest.raises(ValueError, match="shapes differ"):
        train(bad, tmp_path / "ft2", quiet=True)


def test_no_weight_decay_groups():
    from memtrans.config import ModelConfig
    from memtrans.model import MemorizingTransformer
    m = MemorizingTransformer(ModelConfig(dim=32, depth=2, heads=2, head_dim=16, memory_layers=[1], knn_k=4,
                                          memory_size=64))
    decay, plain = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "blocks.1.attn.gate_bias" in plain_names and "norm.weight" in plain_names
    assert "blocks.0.attn.rel_bias.embedding.weight" in plain_names and "blocks.0.attn.log_scale" in plain_names
    assert "blocks.0.attn.qkv.weight" in decay_names and "embed.weight" in decay_names


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_gate_lr_scale_moves_the_gates_faster_and_nothing_else(scale):
    from memtrans.config import ModelConfig
    from memtrans.model import MemorizingTransformer
    from memtrans.train.optim import build_optimizer, build_scheduler
    torch.manual_seed(0)
    m = MemorizingTransformer(ModelConfig(dim=32, depth=2, heads=2, head_dim=16, memory_layers=[1], knn_k=4,
                                          memory_size=64))
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, gate_lr_scale=scale)
    opt = build_optimizer(m, cfg)
    sched = build_scheduler(opt, cfg, 20)
    assert len(opt.param_groups) == (2 if scale == 1.0 else 3)  # the default keeps checkpointed states loadable
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(20):  # the same gradient sign every step: Adam moves each parameter by about its lr per step
        opt.zero_grad()
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters()}
    total_lr = sum(cfg.lr * lr_factor(i, cfg, 20) for i in range(20))
    assert moved["blocks.1.attn.gate_bias"] == pytest.approx(scale * total_lr, rel=0.05)
    assert moved["blocks.0.attn.log_scale"] == pytest.approx(total_lr, rel=0.05)  # other parameters: unchanged lr
    with pytest.raises(ValueError, match="gate_lr_scale"):
        OptimConfig(gate_lr_scale=0)


def test_schedules():
    c = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, c, 100) == pytest.approx(0.1)
    assert lr_factor(9, c, 100) == pytest.approx(1.0)
    assert lr_factor(99, c, 100) == pytest.approx(0.1)
    r = OptimConfig(warmup_steps=10, schedule="rsqrt", min_lr_ratio=0.0)
    assert lr_factor(39, r, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, OptimConfig(schedule="nope"), 10)


def test_stability_tracker():
    t = StabilityTracker(warmup_steps=2, spike_window=10, spike_factor=2.0, divergence_factor=4.0, grad_clip=1.0)
    for s in range(1, 15):
        t.update(s, 2.0, 0.5)
    assert t.update(15, 5.0, 0.5)["loss_spike"]
    assert t.update(16, 2.0, 3.0)["grad_spike"] and t.clipped == 1
    assert t.update(17, 9.0, 0.5)["diverged"]  # > 4 x the reference 2.0
    t2 = StabilityTracker(0)
    t2.load_state_dict(t.state_dict())
    assert t2.summary() == t.summary()
    assert StabilityTracker(0).update(1, math.nan, 1.0)["diverged"]


def test_stability_tracker_counts_fp16_overflows_without_diverging():
    """With a gradient scaler an inf gradient norm on a finite loss is an overflow the scaler skips."""
    t = StabilityTracker(0, spike_window=3, scaled=True)
    for s in range(1, 5):
        t.update(s, 2.0, 0.5)
    flags = t.update(5, 2.0, math.inf)
    assert flags["overflow"] and not flags["diverged"] and not flags["grad_spike"]
    assert t.summary()["overflows"] == 1 and list(t.grads) == [0.5, 0.5, 0.5]  # no inf in the history
    assert t.update(6, math.nan, math.nan)["diverged"]  # a non-finite loss still diverges
    assert StabilityTracker(0).update(1, 2.0, math.inf)["diverged"]  # without a scaler: as before


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_autocast_runs(tmp_path, precision):
    s = train(tiny_config(tmp_path, steps=2, train={"precision": precision}), tmp_path / "run", quiet=True)
    assert s["status"] == "finished" and math.isfinite(s["final_loss"])


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_trains_like_eager(tmp_path):
    """train.compile: torch.compile around the model (memory ops stay eager behind graph breaks) gives the
    eager run's losses up to float reordering."""
    losses = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path, steps=6, train={"compile": compiled, "checkpoint_every": 0})
        assert train(cfg, tmp_path / f"run-{compiled}", quiet=True)["status"] == "finished"
        losses[compiled] = [json.loads(line)["loss"] for line in (tmp_path / f"run-{compiled}" / "metrics.jsonl").open()]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
