"""Optimiser and learning-rate schedule.

Parameter groups: weight decay applies to matrices (projections, FFN, token embedding, output head) and
never to norms, gates, per-head scales, biases or the relative-position bias embedding. With
optim.gate_lr_scale != 1 every parameter named "gate" gets lr * gate_lr_scale (the schedule scales it alike).
Schedules (OptimConfig.schedule): linear warm-up over `warmup_steps`, then
  cosine   cosine decay from lr to lr * min_lr_ratio at train.steps
  rsqrt    lr * sqrt(warmup_steps / step)  (the paper's inverse-square-root decay), floored at lr * min_lr_ratio
  constant lr
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from memtrans.config import OPTIMIZERS, SCHEDULES, OptimConfig  # allowed values live with the config checks


def no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or "rel_bias" in name or "gate" in name or "norm" in name or "log_scale" in name


def is_gate(name: str) -> bool:
    return "gate" in name


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 gate_lr_scale: float = 1.0) -> list[dict]:
    """[decayed, not decayed] (+ the gates at lr * gate_lr_scale, without decay, when the scale is not 1: with
    the default the groups, and so checkpointed optimiser states, stay as they were)."""
    decay, plain, gates = [], [], []
    separate = gate_lr_scale != 1.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            (gates if separate and is_gate(name) else plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if separate and gates:  # (a model without gates keeps the default groups)
        if lr is None:
            raise ValueError("param_groups: a gate_lr_scale needs the base lr")
        groups.append({"params": gates, "weight_decay": 0.0, "lr": lr * gate_lr_scale})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer: {cfg.optimizer!r} is not allowed; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {cfg.lr}")
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.gate_lr_scale)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if not hasattr(torch.optim, "Adafactor"):
        raise ValueError("optim.optimizer=adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
    return torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for optimiser step `step` (0-based: the first update uses step 0)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: {cfg.schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    s = step + 1
    w = max(0, cfg.warmup_steps)
    if w and s <= w:
        return s / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "rsqrt":
        return max(cfg.min_lr_ratio, math.sqrt(max(w, 1) / s))
    span = max(1, total_steps - w)
    progress = min(1.0, (s - w) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    lr_factor(0, cfg, total_steps)  # validates the schedule name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
