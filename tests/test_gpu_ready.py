"""The CUDA path, checked without a GPU: no host synchronisation in the model's forward and backward (a spy on
tensor calls, run on the device code path on CPU), a `meta`-device forward, and the device-agnostic tests of
this file on every available device (`MEMTRANS_TEST_DEVICE=cuda` runs them on CUDA only; benchmarks/gpu_check.sh).

What a GPU run must not do inside `model(tokens, state)` and its backward, and what the spy fails on:
reading a tensor on the host (`item`, `bool`, `int`, `float`, `__index__`, `tolist`, `numpy`), copying it
there (`cpu`, `to("cpu")`), and ops whose output shape depends on the data (`nonzero`, `masked_select`,
`unique`, boolean-mask indexing), which synchronise on CUDA too. The CPU fused retrieval kernels read the
ring on the host by design (they are host code), so the spy runs ExactMemory's torch reference path, the one
CUDA runs, and the model's device checks (`MemorizingTransformer.host_reads = False`).
"""
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from memtrans import MemorizingTransformer, ModelConfig
from memtrans.memory import ExactMemory
from memtrans.model import attention

# Devices the device-agnostic tests run on: CPU, plus CUDA where present; MEMTRANS_TEST_DEVICE names one.
DEVICES = [os.environ["MEMTRANS_TEST_DEVICE"]] if os.environ.get("MEMTRANS_TEST_DEVICE") else (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

SEG = 8
HOST_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"}
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "unique_consecutive", "_unique2", "argwhere"}


class HostSyncError(AssertionError):
    pass


def _is_cpu(x) -> bool:
    """`to("cpu")` names the host; `to(some_device)` does not (on CPU it is a no-op, on CUDA the device itself).
    A device tensor copied to a host tensor in the meta test's NoHostTensors fails there."""
    return isinstance(x, str) and x.startswith("cpu")


class SyncSpy(TorchFunctionMode):
    """Fails on every tensor call that would synchronise a CUDA stream with the host (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        self.calls += 1
        if name in HOST_READS or name in DATA_DEPENDENT:
            raise HostSyncError(f"host synchronisation: Tensor.{name}")
        if name == "to" and (any(_is_cpu(a) for a in args[1:]) or _is_cpu(kwargs.get("device"))):
            raise HostSyncError("host synchronisation: Tensor.to('cpu')")
        if name == "__getitem__" and _has_bool_index(args[1] if len(args) > 1 else None):
            raise HostSyncError("host synchronisation: boolean-mask indexing (a data-dependent shape)")
        return func(*args, **kwargs)


class ScalarSpy(TorchDispatchMode):
    """The same below autograd (the backward's ops too): any read of a tensor's value on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in DATA_DEPENDENT:
            raise HostSyncError(f"host synchronisation: aten.{name}")
        return func(*args, **(kwargs or {}))


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class spy_syncs:
    def __enter__(self):
        self.modes = [SyncSpy(), ScalarSpy()]
        for m in self.modes:
            m.__enter__()
        return self.modes[0]

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)
        return False


def make(device="cpu", memory_layers=(1,), gate="learned_scalar", qk_norm=True, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=32, dim=32, depth=3, heads=2, head_dim=16, segment_len=SEG, memory_layers=memory_layers,
                memory_size=24, knn_k=4, gate=gate, qk_norm=qk_norm, memory_dtype="float32", score_dtype="float32")
    args.update(kw)
    return MemorizingTransformer(ModelConfig(**args)).to(device)


@pytest.fixture
def device_path(monkeypatch):
    """CPU runs the code CUDA runs: the torch reference retrieval and the device-side token check."""
    monkeypatch.setattr(ExactMemory, "use_fast", False)
    monkeypatch.setattr(MemorizingTransformer, "host_reads", False)


def train_segments(model, docs, state, reset_at=2):
    """Forward + backward over the segments of docs [B, L], a new document in slot 0 before segment `reset_at`."""
    for i, s in enumerate(range(0, docs.shape[1], SEG)):
        if i == reset_at:
            model.reset_state(state, [0])
        logits, state = model(docs[:, s:s + SEG], state)
        logits.float().logsumexp(-1).mean().backward()
    return state


@pytest.mark.parametrize("gate", ["learned_scalar", "joint_softmax", "token_gate"])
@pytest.mark.parametrize("reuse", [True, False])
def test_forward_backward_and_reset_never_sync_with_the_host(device_path, gate, reuse, monkeypatch):
    monkeypatch.setattr(attention.Attention, "reuse_scores", reuse)
    model = make(gate=gate, memory_layers=(0, 2)).train()
    docs = torch.randint(0, 32, (2, 6 * SEG), generator=torch.Generator().manual_seed(0))
    state = model.init_state(2)
    with spy_syncs() as spy:  # 6 segments: the ring (24 entries) wraps, slot 0 resets before segment 2
        state = train_segments(model, docs, state)
    assert spy.calls > 100  # the spy saw the model's calls
    assert state.memories[0].count.tolist() == [24, 24] and state.memories[0]._filled == [24, 24]
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate" in n or "qkv" in n)


def test_a_reset_by_a_device_mask_never_syncs_either(device_path):
    model = make()
    docs = torch.randint(0, 32, (2, 4 * SEG), generator=torch.Generator().manual_seed(1))
    state = model.init_state(2)
    model(docs[:, :SEG], state)
    with spy_syncs():  # a mask that is not host data (on CUDA: a tensor on the GPU) is applied, never read
        model.reset_state(state, torch.tensor([False, True]).to(model.device))
        model(docs[:, SEG:2 * SEG], state)
    mem = state.memories[1]
    assert mem.count.tolist() == [2 * SEG, SEG] and mem._filled == [2 * SEG, 2 * SEG]  # host bound, count exact


def test_device_mask_reset_gives_the_host_reset_logits(device_path):
    model = make()
    docs = torch.randint(0, 32, (2, 5 * SEG), generator=torch.Generator().manual_seed(2))
    outs = []
    for how in ("host", "mask"):
        state, out = model.init_state(2), []
        for i, s in enumerate(range(0, docs.shape[1], SEG)):
            if i == 3:
                model.reset_state(state, [1] if how == "host" else torch.tensor([False, True]))
            out.append(model(docs[:, s:s + SEG], state)[0])
        outs.append(torch.cat(out, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["forward", "backward", "reset"])
def test_the_spy_catches_a_deliberate_host_read(device_path, monkeypatch, where):
    model = make().train()
    docs = torch.randint(0, 32, (2, 3 * SEG), generator=torch.Generator().manual_seed(0))
    if where == "forward":
        gate = attention.Attention._gate
        monkeypatch.setattr(attention.Attention, "_gate",
                            lambda self, x, mem, local: (mem.sum().item(), gate(self, x, mem, local))[1])
    elif where == "backward":
        backward = attention._ReusedScores.backward
        monkeypatch.setattr(attention._ReusedScores, "backward",
                            staticmethod(lambda ctx, grad: (float(grad.abs().max()), backward(ctx, grad))[1]))
    else:
        monkeypatch.setattr(ExactMemory, "_on_reset", lambda self, slots: self.count.max().item())
    with pytest.raises(HostSyncError):
        with spy_syncs():
            train_segments(model, docs, model.init_state(2), reset_at=1)


@pytest.mark.parametrize("call", [lambda t: t.cpu(), lambda t: t.to("cpu"), lambda t: t.tolist(), lambda t: bool(t.any()),
                                  lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: int(t[0])])
def test_the_spy_catches_each_kind_of_sync(call):
    t = torch.arange(3)
    call(t)  # fine outside the spy
    with pytest.raises(HostSyncError), spy_syncs():
        call(t)


class NoHostTensors(TorchDispatchMode):
    """On a meta model every op's tensors are on meta: a CPU tensor with data would be a host copy on CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        cpu = [x for x in flat if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 0]
        if cpu:
            raise AssertionError(f"{func}: a host tensor {tuple(cpu[0].shape)} in a meta-device forward")
        return out


@pytest.mark.parametrize("gate", ["learned_scalar", "joint_softmax"])
def test_meta_device_forward_with_memory(gate):
    with torch.device("meta"):
        model = make("meta", gate=gate, memory_layers=(1,))
    assert model.device.type == "meta"
    state = model.init_state(2)
    assert state.memories[1].keys.device.type == "meta"
    tokens = torch.zeros(2, SEG, dtype=torch.long, device="meta")
    with NoHostTensors():
        for i in range(3):  # an empty memory, then a filled one, with a reset between; backward too
            if i == 2:
                model.reset_state(state, [0])
            logits, state = model(tokens, state)
            logits.sum().backward()
    assert logits.device.type == "meta" and logits.shape == (2, SEG, 32) and logits.dtype == torch.float32
    assert state.memories[1].keys.shape[2] >= 2 * SEG
    assert model.blocks[1].attn.qkv.weight.grad.device.type == "meta"


def test_meta_device_search_over_a_bf16_ring_takes_the_fp32_output_matmul():
    """bf16 queries over a bf16 ring off CPU: one bf16 bmm with fp32 output (no fp32 copy of the keys)."""
    mem = ExactMemory(2, 2, 16, 64, dtype=torch.bfloat16, score_dtype=torch.float32, device="meta")
    mem.add(torch.zeros(2, 2, 40, 16, device="meta"), torch.zeros(2, 2, 40, 16, device="meta"))
    with NoHostTensors():
        res = mem.search(torch.zeros(2, 2, 5, 16, device="meta", dtype=torch.bfloat16), 8)
    assert res.scores.dtype == torch.float32 and res.keys.shape == (2, 2, 5, 8, 16)
    assert ExactMemory._bmm_out_dtype is True


@pytest.mark.parametrize("device", DEVICES)
def test_model_on_device_matches_cpu_reference(device, monkeypatch):
    """The same weights and documents on `device` give the CPU reference path's logits (fp32 everywhere)."""
    monkeypatch.setattr(ExactMemory, "use_fast", False)
    docs = torch.randint(0, 32, (2, 6 * SEG), generator=torch.Generator().manual_seed(3))
    outs = []
    for dev in ("cpu", device):
        model = make(dev, memory_layers=(0, 2)).eval()
        state, out = model.init_state(2), []
        for i, s in enumerate(range(0, docs.shape[1], SEG)):
            if i == 3:
                model.reset_state(state, torch.tensor([True, False]))
            out.append(model(docs[:, s:s + SEG].to(dev), state)[0].cpu())
        outs.append(torch.cat(out, 1))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_on_device_runs_under_autocast(device):
    from memtrans.device import autocast_context
    model = make(device, memory_dtype="bfloat16", score_dtype="float32").train()
    docs = torch.randint(0, 32, (2, 3 * SEG), generator=torch.Generator().manual_seed(4)).to(device)
    state = model.init_state(2)
    with autocast_context("bf16", torch.device(device)):
        state = train_segments(model, docs, state, reset_at=1)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", [d for d in DEVICES if d.startswith("cuda")] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device here"))])
def test_cuda_step_has_no_synchronising_call(device):
    """On a GPU, torch itself reports every synchronising CUDA call (blocking copies, item, nonzero, ...):
    forward + backward over several segments with a reset by the stream's CPU mask, in bf16 autocast."""
    from memtrans.device import autocast_context
    model = make(device, memory_layers=(0, 2), memory_dtype="bfloat16", score_dtype="float32").train()
    docs = torch.randint(0, 32, (2, 6 * SEG), generator=torch.Generator().manual_seed(6)).to(device)
    state = model.init_state(2)
    with autocast_context("bf16", torch.device(device)):
        model(docs[:, :SEG], state)[0].sum().backward()  # warm-up: allocations, the rel-bias cache
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i, s in enumerate(range(SEG, docs.shape[1], SEG)):
                if i == 2:
                    model.reset_state(state, torch.tensor([True, False]))  # batch.new_doc is a CPU tensor
                logits, state = model(docs[:, s:s + SEG], state)
                logits.float().logsumexp(-1).mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
