"""The device and precision policy (memtrans.device): one decision, recorded in the run, simulated per machine."""
from __future__ import annotations

import pytest
import torch
import yaml

from memtrans import device as dev
from memtrans.config import load_config
from memtrans.memory import ExactMemory, make_memory

from _train_helpers import tiny_dict


def _fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, isa: str = "AVX2"):
    monkeypatch.delenv("MEMTRANS_BF16", raising=False)
    monkeypatch.setattr(dev, "cpu_capability", lambda: {"isa": isa, "avx512_bf16": avx512_bf16, "amx": amx,
                                                        "machine": "x86_64", "model": "fake"})


@pytest.mark.parametrize("avx512_bf16,amx,native", [(False, False, False), (True, False, True), (False, True, True)])
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, avx512_bf16, amx, native):
    _fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    cfg = dev.resolve_config(load_config(None, ["train.device=cpu"]))
    want = ("bf16", "bfloat16", "bfloat16") if native else ("fp32", "float32", "float32")
    assert (cfg.train.precision, cfg.model.memory_dtype, cfg.model.score_dtype) == want
    mem_dtype, score_dtype = dev.model_dtypes(load_config(None).model, "cpu")
    assert (mem_dtype, score_dtype) == ((torch.bfloat16, torch.bfloat16) if native else (torch.float32, torch.float32))


def test_explicit_values_are_kept(monkeypatch):
    _fake_cpu(monkeypatch, avx512_bf16=False, amx=False)
    cfg = dev.resolve_config(load_config(None, ["train.precision=bf16", "model.memory_dtype=bfloat16"]))
    assert (cfg.train.precision, cfg.model.memory_dtype, cfg.model.score_dtype) == ("bf16", "bfloat16", "float32")


def test_cuda_auto_uses_bf16_only_where_supported(monkeypatch):
    monkeypatch.delenv("MEMTRANS_BF16", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, want in ((True, ("bf16", "bfloat16", "bfloat16")), (False, ("fp32", "float32", "float32"))):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        p = dev.resolve_dtype_names("auto", "auto", "auto", torch.device("cuda"))
        assert (p.precision, p.memory_dtype, p.score_dtype) == want
    # fp16 is an explicit choice for such GPUs, with a gradient scaler
    p = dev.resolve_dtype_names("fp16", "auto", "auto", torch.device("cuda"))
    assert p.precision == "fp16"


def test_fp16_on_cpu_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="train.precision: fp16 needs a GPU"):
        dev.resolve_dtype_names("fp16", "auto", "auto", torch.device("cpu"))
    assert dev.grad_scaler("fp32", torch.device("cpu")) is None


def test_bad_precision_and_device_are_config_errors():
    with pytest.raises(ValueError, match="precision: 'fp99' is not allowed; choose one of auto, bf16, fp16, fp32"):
        load_config(None, ["train.precision=fp99"])
    with pytest.raises(ValueError, match="device: 'tpu' is not allowed"):
        load_config(None, ["train.device=tpu"])
    with pytest.raises(ValueError, match="memory_dtype"):
        load_config(None, ["model.memory_dtype=int4"])


def test_env_override(monkeypatch):
    monkeypatch.setenv("MEMTRANS_BF16", "1")
    assert dev.bf16_native("cpu") == (True, "MEMTRANS_BF16=1")
    monkeypatch.setenv("MEMTRANS_BF16", "0")
    assert dev.resolve_dtype_names("auto", "auto", "auto", "cpu").precision == "fp32"


def test_hash_is_of_the_resolved_config_and_stable_for_published_runs(monkeypatch):
    """On a native-bf16 CPU `auto` resolves to what the defaults used to be, so published run hashes hold."""
    _fake_cpu(monkeypatch, avx512_bf16=True, amx=False)
    auto = dev.resolve_config(load_config(None))
    explicit = load_config(None, ["train.precision=bf16", "model.memory_dtype=bfloat16", "model.score_dtype=bfloat16"])
    assert auto.hash() == explicit.hash()
    _fake_cpu(monkeypatch, avx512_bf16=False, amx=False)
    assert dev.resolve_config(load_config(None)).hash() != explicit.hash()


def test_train_records_resolved_values_and_resume_keeps_them(tmp_path, monkeypatch):
    """config.yaml records the resolved dtypes; resuming on a machine that would decide otherwise keeps them."""
    from memtrans.config import config_from_dict
    from memtrans.train.trainer import resolve_run_config

    _fake_cpu(monkeypatch, avx512_bf16=False, amx=False)
    d = tiny_dict(tmp_path, steps=2)
    d["train"]["precision"] = "auto"
    d["model"]["memory_dtype"] = d["model"]["score_dtype"] = "auto"
    run = tmp_path / "run"
    from memtrans.train.trainer import train
    train(config_from_dict(d), run, quiet=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["precision"], saved["model"]["memory_dtype"], saved["model"]["score_dtype"]) == \
        ("fp32", "float32", "float32")
    _fake_cpu(monkeypatch, avx512_bf16=True, amx=False)  # "another machine" would pick bf16 ...
    again = resolve_run_config(config_from_dict(d), run, torch.device("cpu"))
    assert again.train.precision == "fp32" and again.model.memory_dtype == "float32"  # ... the run keeps fp32
    fresh = resolve_run_config(config_from_dict(d), tmp_path / "other", torch.device("cpu"))
    assert fresh.train.precision == "bf16"


def test_memory_built_from_an_unresolved_model_config_follows_the_policy(monkeypatch):
    _fake_cpu(monkeypatch, avx512_bf16=False, amx=False)
    cfg = load_config(None, ["model.memory_size=64", "model.knn_k=4"]).model
    mem = make_memory(cfg, 1)
    assert mem.dtype == torch.float32 and mem.score_dtype == torch.float32


def test_a_cuda_plan_resolves_on_a_machine_without_cuda(monkeypatch):
    """A `paper` plan (train.device=cuda) is listed and hashed anywhere; only running it needs the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MEMTRANS_BF16", raising=False)
    cfg = dev.resolve_config(load_config(None, ["train.device=cuda"]))
    assert (cfg.train.precision, cfg.model.memory_dtype, cfg.model.score_dtype) == ("bf16", "bfloat16", "bfloat16")
    with pytest.raises(ValueError, match="train.device: cuda was asked for but CUDA is not available"):
        dev.resolve_device("cuda")


def test_a_memory_built_directly_stores_what_the_policy_picks(monkeypatch):
    """ExactMemory(...) without a dtype keeps bf16 entries only where bf16 is native (as a model's memory does)."""
    for flag, want in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv("MEMTRANS_BF16", flag)
        assert ExactMemory(1, 2, 16, 8).dtype == want
