"""Training-stability bookkeeping: loss / gradient-norm spikes, clipped steps, divergence.

- spike: after warm-up, a value above `spike_factor` x the median of the previous `spike_window` values
  (needs at least min(spike_window, 10) earlier values);
- clipped: the pre-clip gradient norm exceeded optim.grad_clip;
- divergence: a NaN/inf loss or gradient norm at any step, or, once the reference exists, a loss above
  `divergence_factor` x the reference = median loss of the first `spike_window` steps after warm-up;
- overflow (`scaled=True`, fp16 with a gradient scaler): a non-finite gradient norm with a finite loss is an
  fp16 overflow, whose step the scaler skips (lowering its scale); it is counted, not a divergence, and enters
  no history.
"""
from __future__ import annotations

import math
from collections import deque
from statistics import median


class StabilityTracker:
    def __init__(self, warmup_steps: int, spike_window: int = 50, spike_factor: float = 2.0,
                 divergence_factor: float = 4.0, grad_clip: float = 0.0, scaled: bool = False):
        self.warmup_steps, self.window = max(0, warmup_steps), max(1, spike_window)
        self.spike_factor, self.divergence_factor, self.grad_clip = spike_factor, divergence_factor, grad_clip
        self.scaled = scaled
        self.overflows = 0
        self.losses: deque = deque(maxlen=self.window)
        self.grads: deque = deque(maxlen=self.window)
        self.reference_losses: list[float] = []
        self.reference: float | None = None
        self.loss_spikes = self.grad_spikes = self.clipped = self.steps = 0
        self.loss_spike_steps: list[int] = []
        self.grad_spike_steps: list[int] = []
        self.diverged_step: int | None = None
        self.diverged_reason: str | None = None

    def _spike(self, history: deque, value: float) -> bool:
        if len(history) < min(self.window, 10):
            return False
        return value > self.spike_factor * median(history)

    def update(self, step: int, loss: float, grad_norm: float) -> dict:
        """Record step `step` (1-based). Returns flags {loss_spike, grad_spike, clipped, diverged, reason, overflow}."""
        self.steps += 1
        out = {"loss_spike": False, "grad_spike": False, "clipped": False, "diverged": False, "reason": None,
               "overflow": False}
        if self.scaled and math.isfinite(loss) and not math.isfinite(grad_norm):
            out["overflow"] = True
            self.overflows += 1
        elif not math.isfinite(loss) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            out.update(diverged=True, reason=f"non-finite {what} at step {step}")
        else:
            after_warmup = step > self.warmup_steps
            if after_warmup:
                out["loss_spike"] = self._spike(self.losses, loss)
                out["grad_spike"] = self._spike(self.grads, grad_norm)
                if self.reference is None:
                    self.reference_losses.append(loss)
                    if len(self.reference_losses) >= self.window:
                        self.reference = median(self.reference_losses)
                elif loss > self.divergence_factor * self.reference:
                    out.update(diverged=True, reason=f"loss {loss:.4g} > {self.divergence_factor} x reference "
                                                     f"{self.reference:.4g} at step {step}")
            out["clipped"] = self.grad_clip > 0 and grad_norm > self.grad_clip
            self.losses.append(loss)
            self.grads.append(grad_norm)
        self.loss_spikes += out["loss_spike"]
        self.grad_spikes += out["grad_spike"]
        self.clipped += out["clipped"]
        if out["loss_spike"]:
            self.loss_spike_steps.append(step)
        if out["grad_spike"]:
            self.grad_spike_steps.append(step)
        if out["diverged"] and self.diverged_step is None:
            self.diverged_step, self.diverged_reason = step, out["reason"]
        return out

    def summary(self) -> dict:
        return {"loss_spikes": self.loss_spikes, "grad_spikes": self.grad_spikes,
                "clipped_fraction": self.clipped / self.steps if self.steps else 0.0,
                "diverged": self.diverged_step is not None, "diverged_step": self.diverged_step,
                "diverged_reason": self.diverged_reason, "loss_spike_steps": self.loss_spike_steps[-100:],
                "grad_spike_steps": self.grad_spike_steps[-100:], "reference_loss": self.reference,
                "overflows": self.overflows}

    def state_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["losses"], d["grads"] = list(self.losses), list(self.grads)
        d["reference_losses"] = list(self.reference_losses)
        d["loss_spike_steps"], d["grad_spike_steps"] = list(self.loss_spike_steps), list(self.grad_spike_steps)
        return d

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if k in ("losses", "grads"):
                getattr(self, k).clear()
                getattr(self, k).extend(v)
            else:
                setattr(self, k, list(v) if isinstance(v, list) else v)
