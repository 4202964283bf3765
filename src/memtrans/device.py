"""Device and precision policy: the one place that decides where a run computes and in which dtypes.

`train.precision`, `model.memory_dtype` and `model.score_dtype` default to `auto`, resolved here once per run
(before the run's config.yaml is written and its hash taken, so the run directory records what ran):

- bf16 only where it is native and fast: CUDA devices that support it, CPUs with AVX512_BF16 or AMX (as torch
  reports them). Elsewhere fp32: on an AVX2-only CPU torch's bf16 matmul ran ~50x slower than fp32 (0.5 vs
  58 GFLOP/s, one thread), and ARM and most laptops have no native bf16 either.
- Retrieval scores: bf16 where bf16 is native (CPU or CUDA): the queries are rounded to bf16 and the products
  summed in fp32 (the fused CPU kernels; `bmm(..., out_dtype=float32)` on CUDA), never rounded before the
  top-k; fp32 elsewhere. fp32 scores on CUDA would mean full-precision fp32 products, off the tensor cores.
- fp16 (autocast + a gradient scaler) is an explicit choice for GPUs without bf16; `auto` never picks it.

`MEMTRANS_BF16=0|1` overrides the detection (a user's escape hatch, and how tests simulate other machines).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_FIELDS = ("train.precision", "model.memory_dtype", "model.score_dtype")


def resolve_device(name: str, require: bool = True) -> torch.device:
    """`train.device` -> a torch.device: auto = CUDA when present, else CPU.

    `require=False` names a device this machine may lack: a plan is resolved (listed, hashed) wherever it is
    read, and a `paper` plan asks for CUDA on a laptop too; the run itself resolves with `require=True`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda", "meta") and not name.startswith("cuda:"):
        raise ValueError(f"train.device: {name!r} is not allowed; choose auto, cpu, cuda or cuda:N")
    if require and name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but CUDA is not available; set train.device=cpu (or auto)")
    return torch.device(name)


def cpu_capability() -> dict:
    """What torch reports about this CPU (pasted into bug reports by `memtrans info`)."""
    return {"isa": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "machine": platform.machine(), "model": _cpu_model()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bf16_native(device: torch.device | str) -> tuple[bool, str]:
    """(whether bf16 is native and fast on `device`, why)."""
    device = torch.device(device)
    forced = os.environ.get("MEMTRANS_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"MEMTRANS_BF16={forced}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            # planning for a GPU from a machine without one: the GPUs this project targets (Ampere and newer)
            # have bf16; the run resolves again on its own device (a recorded value is kept, see resolve_config)
            return True, "no CUDA device here: assumed to support bf16 (Ampere or newer)"
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, "CUDA device " + ("supports bf16" if ok else "lacks native bf16")
    if device.type == "cpu":
        cap = cpu_capability()
        if cap["amx"] or cap["avx512_bf16"]:
            return True, "CPU has " + ("AMX" if cap["amx"] else "AVX512_BF16")
        return False, f"CPU ({cap['isa']}) lacks AVX512_BF16 and AMX"
    return False, f"{device.type} device"


@dataclasses.dataclass(frozen=True)
class Policy:
    device: torch.device
    precision: str  # bf16 | fp16 | fp32 (autocast dtype of the model's matmuls; fp32 = no autocast)
    memory_dtype: str  # dtype of stored memory keys/values
    score_dtype: str  # dtype of the exact engine's retrieval scores
    reason: str

    def describe(self) -> str:
        return (f"device {self.device}, precision {self.precision}, memory {self.memory_dtype}, "
                f"scores {self.score_dtype} ({self.reason})")


def resolve_dtype_names(precision: str, memory_dtype: str, score_dtype: str, device: torch.device | str,
                        recorded: dict | None = None) -> Policy:
    """Replace every `auto` by this device's choice; `recorded` (a run's saved values, dotted keys) wins over
    the detection so that a resumed run keeps the dtypes it started with."""
    device = torch.device(device)
    native, why = bf16_native(device)
    recorded = recorded or {}
    picks = {"train.precision": "bf16" if native else "fp32",
             "model.memory_dtype": "bfloat16" if native else "float32",
             "model.score_dtype": "bfloat16" if native else "float32"}
    given = {"train.precision": precision, "model.memory_dtype": memory_dtype, "model.score_dtype": score_dtype}
    out = {}
    for key, value in given.items():
        if value == "auto":
            value = recorded.get(key) if recorded.get(key) not in (None, "auto") else picks[key]
        out[key] = value
    if out["train.precision"] == "fp16" and device.type == "cpu":
        raise ValueError("train.precision: fp16 needs a GPU (a gradient scaler on CPU autocast is not supported); "
                         "choose auto, bf16 or fp32")
    return Policy(device, out["train.precision"], out["model.memory_dtype"], out["model.score_dtype"], why)


def resolve_config(cfg, device: torch.device | str | None = None, recorded: dict | None = None):
    """A copy of Config `cfg` with no `auto` left in the fields this module decides (see module docstring)."""
    from memtrans.config import Config
    assert isinstance(cfg, Config)
    device = resolve_device(cfg.train.device, require=False) if device is None else torch.device(device)
    p = resolve_dtype_names(cfg.train.precision, cfg.model.memory_dtype, cfg.model.score_dtype, device, recorded)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=p.precision),
                               model=dataclasses.replace(cfg.model, memory_dtype=p.memory_dtype,
                                                         score_dtype=p.score_dtype))


def policy_of(cfg, device: torch.device | str | None = None) -> Policy:
    device = resolve_device(cfg.train.device, require=False) if device is None else torch.device(device)
    return resolve_dtype_names(cfg.train.precision, cfg.model.memory_dtype, cfg.model.score_dtype, device)


def model_dtypes(model_cfg, device: torch.device | str = "cpu") -> tuple[torch.dtype, torch.dtype]:
    """(memory dtype, score dtype) of a ModelConfig as torch dtypes, `auto` resolved for `device` (a model built
    from the Python API without a resolved run config gets the same choice as a run)."""
    p = resolve_dtype_names("fp32", model_cfg.memory_dtype, model_cfg.score_dtype, device)
    return DTYPES[p.memory_dtype], DTYPES[p.score_dtype]


def autocast_context(precision: str, device: torch.device):
    """The autocast context of a resolved `train.precision` (fp32: none)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"train.precision: {precision!r} is not allowed; choose one of {', '.join(PRECISIONS)}")


def grad_scaler(precision: str, device: torch.device):
    """A gradient scaler for fp16 (whose small gradients underflow without one); None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


__all__ = ["PRECISIONS", "DTYPE_NAMES", "DTYPES", "Policy", "resolve_device", "cpu_capability", "bf16_native",
           "resolve_config", "resolve_dtype_names", "policy_of", "model_dtypes", "autocast_context", "grad_scaler"]
