"""Memory engines: FIFO semantics, slot isolation, masking, and agreement with the exact reference."""
import numpy as np
import pytest
import torch

from memtrans import ModelConfig
from memtrans.memory import ExactMemory, make_memory
from memtrans.memory.faiss_engines import FaissFlatMemory, FaissIVFMemory

B, H, D = 2, 3, 16


def filled(cls, capacity=256, T=40, seed=0, **kw):
    """Slot 0 written past capacity (ring wrapped); slot 1 reset and refilled with 2*T entries."""
    g = torch.Generator().manual_seed(seed)
    mem = cls(B, H, D, capacity, dtype=torch.float32, **kw)
    for step in range(10):
        if step == 8:
            mem.reset([1])
        start = step * T
        mem.add(torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
                torch.arange(start, start + T).expand(B, T))
    assert mem.count.tolist() == [capacity, 2 * T]
    return mem


def recall(a, b):
    """Mean share of b's valid neighbours that a also returned (per query)."""
    hits = [(len(set(x[v].tolist()) & set(y[w].tolist())) / max(1, int(w.sum())))
            for x, v, y, w in zip(a.indices.reshape(-1, a.indices.shape[-1]), a.valid.reshape(-1, a.valid.shape[-1]),
                                  b.indices.reshape(-1, b.indices.shape[-1]), b.valid.reshape(-1, b.valid.shape[-1]))]
    return float(np.mean(hits))


def test_fifo_keeps_newest_entries():
    mem = ExactMemory(1, 1, 4, capacity=10, dtype=torch.float32)
    for start in range(0, 25, 5):
        mem.add(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), torch.arange(start, start + 5)[None])
    assert len(mem) == 10
    res = mem.search(torch.randn(1, 1, 3, 4), 10)
    assert res.valid.all()
    assert sorted(res.positions[0, 0, 0].tolist()) == list(range(15, 25))  # the 10 newest survive


def test_add_longer_than_capacity_keeps_tail():
    mem = ExactMemory(1, 1, 4, capacity=8, dtype=torch.float32)
    mem.add(torch.randn(1, 1, 20, 4), torch.randn(1, 1, 20, 4), torch.arange(20)[None])
    res = mem.search(torch.randn(1, 1, 2, 4), 8)
    assert sorted(res.positions[0, 0, 0].tolist()) == list(range(12, 20))


def test_partial_fill_and_k_larger_than_filled_is_masked():
    mem = filled(ExactMemory)
    mem.reset([1])
    mem.add(torch.randn(B, H, 5, D), torch.randn(B, H, 5, D))
    res = mem.search(torch.randn(B, H, 7, D), 32)
    assert res.valid[0].all()
    assert (res.valid[1].sum(-1) == 5).all()
    assert torch.isinf(res.scores[1][~res.valid[1]]).all()
    assert (res.positions[1][~res.valid[1]] == -1).all()


def test_empty_memory_returns_nothing_valid():
    mem = ExactMemory(B, H, D, 64)
    res = mem.search(torch.randn(B, H, 4, D), 8)
    assert res.keys.shape == (B, H, 4, 8, D) and not res.valid.any()


def test_reset_clears_only_named_slots():
    mem = filled(ExactMemory)
    q = torch.randn(B, H, 5, D)
    before = mem.search(q, 8)
    mem.reset([1])
    after = mem.search(q, 8)
    assert not after.valid[1].any()
    assert torch.equal(before.indices[0], after.indices[0]) and torch.equal(before.keys[0], after.keys[0])


def test_search_is_exact_and_chunking_does_not_change_it():
    mem = filled(ExactMemory)
    q = torch.randn(B, H, 6, D)
    res = mem.search(q, 10)
    for b, n in enumerate(mem.count.tolist()):
        s = torch.einsum("htd,hnd->htn", q[b], mem.keys[b, :, :n])
        top = s.topk(10, -1)
        assert torch.equal(res.indices[b], top.indices)
        torch.testing.assert_close(res.scores[b], top.values)
    mem.max_block_elements = B * H * 6 * 16  # force 16-entry chunks
    chunked = mem.search(q, 10)
    assert torch.equal(chunked.indices, res.indices)


def test_retrieved_keys_values_match_ring_and_carry_no_grad():
    mem = filled(ExactMemory)
    q = torch.randn(B, H, 3, D, requires_grad=True)
    res = mem.search(q, 4)
    b, h, t, j = 1, 2, 1, 3
    i = res.indices[b, h, t, j]
    assert torch.equal(res.keys[b, h, t, j], mem.keys[b, h, i])
    assert torch.equal(res.values[b, h, t, j], mem.values[b, h, i])
    assert not res.keys.requires_grad and not res.values.requires_grad


def test_faiss_flat_matches_exact():
    q = torch.randn(B, H, 9, D)
    exact, flat = filled(ExactMemory).search(q, 16), filled(FaissFlatMemory).search(q, 16)
    assert torch.equal(exact.valid, flat.valid)
    assert torch.equal(exact.indices, flat.indices)
    torch.testing.assert_close(exact.scores, flat.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(exact.values, flat.values)


def clustered(n, d, clusters, g):
    centres = torch.randn(clusters, d, generator=g) * 3
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return x


@pytest.mark.parametrize("nprobe", [8])
def test_faiss_ivf_recall_on_clustered_keys_with_fifo(nprobe):
    g = torch.Generator().manual_seed(0)
    capacity, T, d = 2048, 256, 16
    exact = ExactMemory(1, 2, d, capacity, dtype=torch.float32)
    ivf = FaissIVFMemory(1, 2, d, capacity, dtype=torch.float32, nlist=32, nprobe=nprobe)
    data = clustered(3 * capacity, d, 32, g)
    for start in range(0, len(data), T):  # wraps the ring: exercises remove_ids
        keys = data[start:start + T].expand(1, 2, T, d).contiguous()
        for mem in (exact, ivf):
            mem.add(keys, keys, torch.arange(start, start + T)[None])
        if start == capacity:  # the index is trained lazily at the first search with enough entries
            ivf.search(keys[:, :, :4], 4)
            assert ivf.indexes[0][0] is not None
    assert ivf.indexes[0][0] is not None and ivf.indexes[0][0].ntotal == capacity
    q = clustered(64, d, 32, g).expand(1, 2, 64, d).contiguous()
    r = recall(ivf.search(q, 32), exact.search(q, 32))
    print(f"faiss_ivf recall@32 vs exact (clustered, nprobe={nprobe}): {r:.3f}")
    assert r >= 0.9
    res = ivf.search(q, 32)  # every hit is a live ring entry: no stale (removed) entries come back
    assert (res.positions[res.valid] >= 3 * capacity - capacity).all()


def test_bf16_scores_recall_against_fp32():
    g = torch.Generator().manual_seed(1)
    fp32 = ExactMemory(1, 2, 32, 4096, dtype=torch.bfloat16, score_dtype=torch.float32)
    bf16 = ExactMemory(1, 2, 32, 4096, dtype=torch.bfloat16, score_dtype=torch.bfloat16)
    keys = torch.nn.functional.normalize(clustered(4096, 32, 64, g), dim=-1).expand(1, 2, 4096, 32).contiguous()
    for mem in (fp32, bf16):
        mem.add(keys, keys)
    q = torch.nn.functional.normalize(clustered(128, 32, 64, g), dim=-1).expand(1, 2, 128, 32).contiguous()
    r = recall(bf16.search(q, 32), fp32.search(q, 32))
    print(f"bf16-score recall@32 vs fp32: {r:.3f}")
    assert r >= 0.9


def test_state_dict_round_trip_gives_identical_search():
    mem = filled(ExactMemory)
    q = torch.randn(B, H, 5, D)
    copy = ExactMemory(B, H, D, 256, dtype=torch.float32)
    copy.load_state_dict(mem.state_dict())
    a, b = mem.search(q, 8), copy.search(q, 8)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.keys, b.keys)
    mem.add(torch.ones(B, H, 3, D), torch.ones(B, H, 3, D))
    copy.add(torch.ones(B, H, 3, D), torch.ones(B, H, 3, D))
    assert torch.equal(mem.search(q, 8).indices, copy.search(q, 8).indices)
    with pytest.raises(ValueError, match="capacity"):
        ExactMemory(B, H, D, 128).load_state_dict(mem.state_dict())


def test_nbytes_grows_with_fill_not_capacity():
    mem = ExactMemory(1, 2, 8, capacity=1 << 20, dtype=torch.bfloat16)
    empty = mem.nbytes
    mem.add(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8))
    assert empty < mem.nbytes < (1 << 20) * 2 * 8 * 2  # far below a fully allocated ring


def test_bad_shapes_and_slots_raise():
    mem = ExactMemory(B, H, D, 16)
    with pytest.raises(ValueError, match="head_dim"):
        mem.add(torch.randn(B, H, 2, D + 1), torch.randn(B, H, 2, D + 1))
    with pytest.raises(ValueError, match="slots"):
        mem.reset([5])


@pytest.mark.parametrize("backend", ["exact", "faiss_flat", "faiss_ivf"])
def test_factory_builds_each_backend(backend):
    cfg = ModelConfig(dim=32, heads=2, head_dim=16, depth=2, memory_layers=(1,), memory_size=512,
                      memory_backend=backend, ivf_nlist=4)
    mem = make_memory(cfg, batch_size=2)
    assert mem.name == backend
    mem.add(torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16))
    res = mem.search(torch.randn(2, 2, 4, 16), 8)
    assert res.valid.all() and len(mem) == 600


# ---- the device path (what CUDA runs); benchmarks/gpu_check.sh runs these on CUDA ------------------------------
import os  # noqa: E402

DEVICES = [os.environ["MEMTRANS_TEST_DEVICE"]] if os.environ.get("MEMTRANS_TEST_DEVICE") else (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))


def device_filled(device, dtype=torch.float32, capacity=256, T=40, seed=0, **kw):
    """`filled` on `device` through the reference path, slot 1 reset by a mask on the device."""
    g = torch.Generator().manual_seed(seed)
    mem = ExactMemory(B, H, D, capacity, dtype=dtype, device=device, fast=False, **kw)
    for step in range(10):
        if step == 8:
            mem.reset(torch.tensor([False, True], device=device))
        start = step * T
        mem.add(torch.randn(B, H, T, D, generator=g).to(device), torch.randn(B, H, T, D, generator=g).to(device),
                torch.arange(start, start + T).expand(B, T).to(device))
    assert mem.count.device.type == torch.device(device).type and mem.count.tolist() == [capacity, 2 * T]
    return mem


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 16])
def test_reference_search_on_device_is_exact_fp32(device, chunk):
    """fp32 scores of every filled entry, top-k by them; a running top-k over 16-entry chunks gives the same."""
    mem = device_filled(device)
    if chunk:
        mem.max_block_elements = B * H * 6 * chunk
    q = torch.randn(B, H, 6, D, generator=torch.Generator().manual_seed(1))
    res = mem.search(q.to(device), 10)
    assert res.scores.dtype == torch.float32 and res.scores.device.type == torch.device(device).type
    for b, n in enumerate(mem.count.tolist()):
        s = torch.einsum("htd,hnd->htn", q[b].double(), mem.keys[b, :, :n].cpu().double())
        top = s.topk(10, -1)
        assert torch.equal(res.indices[b].cpu(), top.indices)
        torch.testing.assert_close(res.scores[b].cpu().double(), top.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(res.keys[b].cpu(), mem.keys[b].cpu()[torch.arange(H)[:, None, None], top.indices])
    assert (res.positions[1] >= 8 * 40).all()  # slot 1 holds only what was written after its reset


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_operands_are_summed_in_fp32_on_device(device):
    """A bf16 ring with bf16 queries (as under bf16 autocast): scores are fp32 sums of the exact bf16 products,
    not bf16-rounded scores (which tie and reorder the top-k of crowded keys)."""
    mem = device_filled(device, dtype=torch.bfloat16, score_dtype=torch.float32)
    q = torch.randn(B, H, 6, D, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    res = mem.search(q.to(device), 10)
    for b, n in enumerate(mem.count.tolist()):
        s = torch.einsum("htd,hnd->htn", q[b].double(), mem.keys[b, :, :n].cpu().double())
        top = s.topk(10, -1)
        torch.testing.assert_close(res.scores[b].cpu().double(), top.values, rtol=1e-6, atol=1e-5)
        assert torch.equal(res.indices[b].cpu(), top.indices)


def test_block_budget_by_device():
    mem = ExactMemory(B, H, D, 64, fast=False)
    assert mem.block_elements() == ExactMemory.cpu_block_elements
    mem.max_block_elements = 1000
    assert mem.block_elements() == 1000
    if torch.cuda.is_available():
        gpu = ExactMemory(B, H, D, 64, device="cuda")
        total = torch.cuda.get_device_properties(0).total_memory
        assert gpu.block_elements() == max(ExactMemory.cpu_block_elements, int(total / 16) // 4)


@pytest.mark.parametrize("device", DEVICES)
def test_faiss_engines_keep_their_ring_on_the_host(device):
    """faiss engines are host engines: on a GPU model the ring stays in host memory (no per-search ring copy)
    and results come back on the queries' device, equal to exact search."""
    g = torch.Generator().manual_seed(3)
    flat = FaissFlatMemory(B, H, D, 128, dtype=torch.float32, device=device)
    exact = ExactMemory(B, H, D, 128, dtype=torch.float32, device=device, fast=False)
    assert flat.keys.device.type == "cpu" and flat.model_device.type == torch.device(device).type
    for _ in range(3):
        k = torch.randn(B, H, 40, D, generator=g).to(device)
        for mem in (flat, exact):
            mem.add(k, k)
    q = torch.randn(B, H, 5, D, generator=g).to(device)
    a, b = flat.search(q, 8), exact.search(q, 8)
    assert a.keys.device == q.device and torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_search_under_autocast_keeps_fp32_scores(device):
    """Training runs the model under bf16 autocast, which would run the score matmul in bf16 (scores rounded to
    bf16 before the top-k): search turns autocast off, so it returns what it returns outside autocast."""
    mem = device_filled(device)
    q = torch.randn(B, H, 6, D, generator=torch.Generator().manual_seed(4)).to(device)
    plain = mem.search(q, 10)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        auto = mem.search(q, 10)
    assert torch.equal(auto.indices, plain.indices) and torch.equal(auto.scores, plain.scores)


def test_reference_search_launches_do_not_grow_with_slots_or_heads():
    """One batched matmul + topk per chunk of ring entries (and one merge topk per chunk after the first),
    however many slots and heads: ceil(filled / chunk) chunks, chunk = block budget / (B * H * T)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            self.n[name] = self.n.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    T = 4
    for b, h in ((1, 1), (4, 3)):
        mem = ExactMemory(b, h, D, 4096, dtype=torch.float32, fast=False)
        mem.add(torch.randn(b, h, 4096, D), torch.randn(b, h, 4096, D))
        mem.max_block_elements = b * h * T * 1024  # 1024-entry chunks: 4 of them
        with Count() as c:
            mem.search(torch.randn(b, h, T, D), 8)
        assert c.n.get("matmul", 0) + c.n.get("bmm", 0) == 4 and c.n["topk"] == 4 + 3, c.n
