"""The fused exact top-k kernel (memory/fast_topk.py) against the torch reference path of ExactMemory."""
import pytest
import torch
import torch.nn.functional as F

from memtrans.memory import ExactMemory
from memtrans.memory import fast_topk

pytestmark = pytest.mark.skipif(not fast_topk.available(),
                                reason=f"fused kernel unavailable: {fast_topk.unavailable_reason()}")


@pytest.fixture(autouse=True, params=fast_topk.runnable_isas() or ["none"])
def kernel_isa(request):
    """Every test here runs once per kernel this machine can execute (AVX-512, AVX2, portable), the lower ones
    forced as MEMTRANS_CPU_ISA would; the int8 prefilter exists in the AVX-512 kernel only."""
    isa = request.param
    uses_int8 = "int8" in request.node.name or request.node.get_closest_marker("int8") is not None
    if uses_int8 and isa != "avx512":
        pytest.skip(f"the int8 prefilter is AVX-512 only (kernel {isa})")
    assert fast_topk.use_isa(isa) == isa
    from conftest import record_retrieval_path
    record_retrieval_path(f"fused-{isa}" + ("+int8" if uses_int8 else ""))
    yield isa
    fast_topk.use_isa(None)


PREFILTERS = ["none", pytest.param("int8", marks=pytest.mark.skipif(
    not fast_topk.int8_available(), reason="CPU lacks AVX-512 VNNI for the int8 prefilter"))]
PATH = {"none": "fused", "int8": "fused-int8"}


def build(B, H, D, capacity, fills, dtype, score_dtype, seed=0, clustered=False, prefilter="none"):
    """A fast and a reference ExactMemory with identical contents, through the public add/reset API.
    Slot b ends holding the last fills[b] entries written (more than capacity wraps its ring); writes come
    in unaligned chunks of 37 and slots are reset at different points, so counts and wrap points differ."""
    g = torch.Generator().manual_seed(seed)
    mems = [ExactMemory(B, H, D, capacity, dtype=dtype, score_dtype=score_dtype, fast=f, prefilter=prefilter)
            for f in (True, False)]
    centres = torch.randn(16, D, generator=g)
    W = max(fills)
    breaks = sorted(set(range(0, W, 37)) | {W - n for n in fills if 0 < n < W} | {W})
    for s, e in zip(breaks[:-1], breaks[1:]):
        for m in mems:
            m.reset([b for b, n in enumerate(fills) if W - n == s and n < W])
        T = e - s
        if clustered:
            x = centres[torch.randint(0, 16, (B * H * T,), generator=g)] + 0.3 * torch.randn(B * H * T, D, generator=g)
            keys = F.normalize(x, dim=-1).view(B, H, T, D)
        else:
            keys = torch.randn(B, H, T, D, generator=g)
        vals = torch.randn(B, H, T, D, generator=g)
        for m in mems:
            m.add(keys, vals, torch.arange(s, e).expand(B, T))
    for m in mems:
        m.reset([b for b, n in enumerate(fills) if n == 0])
    return mems


def assert_same_topk(fast, ref, tol):
    """Same valid mask, same sorted scores (within tol), and index sets that differ only at ties."""
    assert torch.equal(fast.valid, ref.valid)
    torch.testing.assert_close(fast.scores, ref.scores, atol=tol, rtol=0)
    k = ref.indices.shape[-1]
    fi, ri = fast.indices.reshape(-1, k), ref.indices.reshape(-1, k)
    fv, rs = fast.valid.reshape(-1, k), ref.scores.reshape(-1, k)
    same = (fi.sort(-1).values == ri.sort(-1).values).all(-1)
    for row in (~same).nonzero().flatten().tolist():
        a, b = set(fi[row][fv[row]].tolist()), set(ri[row][fv[row]].tolist())
        kth = rs[row][fv[row]].min()
        diff_scores = [s for i, s in zip(ri[row].tolist(), rs[row].tolist()) if i in b - a]
        assert all(abs(s - kth) <= tol for s in diff_scores), f"row {row}: non-tie difference {a ^ b}"
    assert same.float().mean() >= 0.99


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 16])
def test_fp32_fast_path_equals_reference(dtype, D, prefilter):
    # slot 0 wrapped (700 written into 256), slot 1 partly filled, slot 2 fewer than k, slot 3 empty
    B, H = 4, 3
    fast, ref = build(B, H, D, 256, [700, 100, 10, 0], dtype, torch.float32, prefilter=prefilter)
    assert fast.count.tolist() == [256, 100, 10, 0] and fast.active_path() == PATH[prefilter]
    assert ref.active_path() == "reference"
    q = torch.randn(B, H, 45, D)  # 45 queries: not a multiple of the 32-query tile
    for k in (1, 32, 300):  # 300 > every slot's fill
        a, b = fast.search(q, k), ref.search(q, k)
        assert_same_topk(a, b, tol=3e-5)  # |scores| reach ~30 here; fp32 summation order differs by ~1e-6 relative
        i = a.indices[0, 1, 7, 0]  # retrieved keys/values are the ring's entries
        assert torch.equal(a.keys[0, 1, 7, 0], fast.keys[0, 1, i]) and torch.equal(a.values[0, 1, 7, 0], fast.values[0, 1, i])
        assert (a.positions[~a.valid] == -1).all() and not a.valid[3].any()
        assert (a.valid[2].sum(-1) == min(k, 10)).all()


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_fast_bf16_scores_match_same_dtype_reference_exactly(prefilter):
    """bf16 mode = bf16 queries x bf16 keys accumulated in fp32: compare with exactly that computation."""
    B, H, D = 2, 2, 64
    fast, _ = build(B, H, D, 512, [1200, 300], torch.bfloat16, torch.bfloat16, prefilter=prefilter)
    q = torch.randn(B, H, 33, D)
    res = fast.search(q, 32)
    qb = q.to(torch.bfloat16).float()
    for b, n in enumerate(fast.count.tolist()):
        s = torch.einsum("htd,hnd->htn", qb[b], fast.keys[b, :, :n].float())
        top = s.topk(32, -1)
        ref = type("R", (), {})()
        ref.valid, ref.scores, ref.indices = torch.ones_like(top.indices, dtype=torch.bool), top.values, top.indices
        sub = type("R", (), {})()
        sub.valid, sub.scores, sub.indices = res.valid[b], res.scores[b], res.indices[b]
        assert_same_topk(sub, ref, tol=1e-5)


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_fast_bf16_recall_against_fp32_exact(prefilter):
    B, H, D = 1, 4, 64
    fast, _ = build(B, H, D, 4096, [4096], torch.bfloat16, torch.bfloat16, clustered=True, seed=3, prefilter=prefilter)
    fp32 = ExactMemory(B, H, D, 4096, dtype=torch.bfloat16, score_dtype=torch.float32, fast=False)
    ref_bf16 = ExactMemory(B, H, D, 4096, dtype=torch.bfloat16, score_dtype=torch.bfloat16, fast=False)
    for m in (fp32, ref_bf16):
        m.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(4)
    q = F.normalize(fast.keys[:, :, :128].float() + 0.2 * torch.randn(B, H, 128, D, generator=g), dim=-1)
    truth = fp32.search(q, 32)

    def recall(r):
        return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in
                   zip(r.indices.reshape(-1, 32), truth.indices.reshape(-1, 32))) / truth.indices.numel()

    r_fast, r_ref = recall(fast.search(q, 32)), recall(ref_bf16.search(q, 32))
    print(f"recall@32 vs fp32: fused bf16 {r_fast:.4f}, reference bf16 {r_ref:.4f}")
    assert r_fast >= 0.99 and r_fast >= r_ref - 1e-9


@pytest.mark.parametrize("prefilter", PREFILTERS)
def test_threads_do_not_change_results(prefilter):
    fast, _ = build(3, 2, 64, 1024, [2000, 700, 5], torch.bfloat16, torch.float32, prefilter=prefilter)
    q = torch.randn(3, 2, 100, 64)
    codes = fast_topk.Int8Codes.of(fast.keys) if prefilter == "int8" else None
    one = fast_topk.topk(q, fast.keys, fast.count, 16, torch.float32, threads=1, codes=codes)
    two = fast_topk.topk(q, fast.keys, fast.count, 16, torch.float32, threads=2, codes=codes)
    if codes is not None:  # and the same when some tasks fall back to the plain kernel
        three = fast_topk.topk(q, fast.keys, fast.count, 16, torch.float32, threads=2, codes=codes, int8_budget=0.0)
        assert torch.equal(one[1].sort(-1).values, three[1].sort(-1).values)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_unsupported_inputs_fall_back_to_reference():
    # odd head_dim and bf16 scores over an fp32 ring are not handled by the kernel: the reference runs
    for D, dtype, sd in ((15, torch.float32, torch.float32), (16, torch.float32, torch.bfloat16)):
        fast, ref = build(2, 2, D, 128, [300, 40], dtype, sd)
        assert fast.active_path() == "reference"
        q = torch.randn(2, 2, 9, D)
        a, b = fast.search(q, 8), ref.search(q, 8)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


def test_class_switch_forces_reference(monkeypatch):
    monkeypatch.setattr(ExactMemory, "use_fast", False)
    assert ExactMemory(1, 1, 8, 16).active_path() == "reference"
    assert ExactMemory(1, 1, 8, 16, fast=True, dtype=torch.float32, prefilter="none").active_path() == "fused"


def test_int8_prefilter_needs_head_dim_multiple_of_4():
    # head_dim 6 is even (the plain kernel runs) but not a multiple of 4 (VNNI words): no int8 prefilter
    fast, ref = build(2, 2, 6, 128, [300, 40], torch.bfloat16, torch.float32, prefilter="int8")
    assert fast.active_path() == "fused" and fast._codes is None
    q = torch.randn(2, 2, 9, 6)
    assert_same_topk(fast.search(q, 8), ref.search(q, 8), tol=1e-5)
    assert fast._codes is None


def test_bad_prefilter_is_a_clear_error():
    with pytest.raises(ValueError, match="prefilter must be 'int8' or 'none'"):
        ExactMemory(1, 1, 8, 16, prefilter="int4")


# ---- the int8 prefilter: exact by construction, so it must agree with the plain kernel on hard inputs ----
def int8_only(test):
    """An int8-prefilter test: skipped without AVX-512 VNNI, and run with the AVX-512 kernel only."""
    return pytest.mark.int8(pytest.mark.skipif(not fast_topk.int8_available(), reason="CPU lacks AVX-512 VNNI")(test))


def _check_int8(keys, q, k, score_dtype, rtol=1e-5):
    """The int8 path equals the plain kernel: forced to finish however crowded the band (budget inf), with
    the default budget, and forced straight onto its plain-kernel fallback (budget 0)."""
    counts = torch.full((keys.shape[0],), keys.shape[2])
    plain = fast_topk.topk(q, keys, counts, k, score_dtype, threads=1)
    codes = fast_topk.Int8Codes.of(keys)
    for budget in (float("inf"), 1.0, 0.0):
        _assert_same(plain, fast_topk.topk(q, keys, counts, k, score_dtype, threads=1, codes=codes, int8_budget=budget),
                     rtol=rtol)


def _assert_same(plain, int8, rtol=1e-5):
    """Same scores rank by rank (up to fp32 summation order) and the same index sets up to ties."""
    (ps, pi), (qs, qi) = plain, int8
    torch.testing.assert_close(qs, ps, atol=1e-6, rtol=rtol)
    same = (pi.sort(-1).values == qi.sort(-1).values).all(-1)
    kth = ps[..., -1]
    tol = 1e-6 + rtol * ps.abs().max().item()
    for idx in (~same).nonzero().tolist():  # a different index set is allowed only through ties at the k-th score
        a, b = set(pi[tuple(idx)].tolist()), set(qi[tuple(idx)].tolist())
        scores = dict(zip(pi[tuple(idx)].tolist(), ps[tuple(idx)].tolist()))
        assert all(abs(scores[i] - kth[tuple(idx)]) <= tol for i in a - b), f"{idx}: non-tie difference {a ^ b}"


@int8_only
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 256])  # 256: products beyond 2^21, where the rounding margin grows with D
def test_int8_prefilter_is_exact_on_near_duplicate_keys(score_dtype, head_dim):
    """Thousands of keys within 1e-3 of each other: their int8 codes cannot rank them (the quantisation error
    is ~10x the score gaps), so only the error bound and the exact re-rank keep the top-k right."""
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(2, 3, 1, head_dim, generator=g), dim=-1)
    keys = F.normalize(base + 1e-3 * torch.randn(2, 3, 3000, head_dim, generator=g), dim=-1).to(torch.bfloat16)
    q = F.normalize(base + 0.05 * torch.randn(2, 3, 40, head_dim, generator=g), dim=-1)
    _check_int8(keys, q, 32, score_dtype)


@int8_only
def test_int8_prefilter_is_exact_on_unnormalised_and_degenerate_keys():
    """No qk-norm: norms spanning 1e-3..1e3, exact zero keys, exact duplicates, a zero query, a huge query."""
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 1, 2, 2500, 64
    scale = torch.logspace(-3, 3, N)[torch.randperm(N, generator=g)]
    keys = torch.randn(B, H, N, D, generator=g) * scale[:, None]
    keys[:, :, :50] = 0
    keys[:, :, 100:200] = keys[:, :, 200:300]
    keys = keys.float()
    q = torch.randn(B, H, 33, D, generator=g)
    q[:, :, 0] = 0
    q[:, :, 1] *= 1e4
    _check_int8(keys, q, 32, torch.float32)
    _check_int8(keys[..., :24].contiguous(), q[..., :24].contiguous(), 7, torch.float32)


@int8_only
def test_int8_prefilter_falls_back_when_the_band_is_crowded():
    """Keys that nearly all score alike (as in some trained heads) put most entries within the error bound:
    the (slot, head) then runs the plain kernel, which is cheaper there. Spread keys keep the prefilter."""
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 2, 1, 64, generator=g), dim=-1)
    crowded = F.normalize(base + 1e-3 * torch.randn(1, 2, 8192, 64, generator=g), dim=-1).to(torch.bfloat16)
    spread = F.normalize(torch.randn(1, 2, 8192, 64, generator=g), dim=-1).to(torch.bfloat16)
    q = F.normalize(torch.randn(1, 2, 64, 64, generator=g), dim=-1)
    counts = torch.tensor([8192])
    for keys, falls_back in ((crowded, True), (spread, False)):
        before = dict(fast_topk.stats)
        fast_topk.topk(q, keys, counts, 32, torch.bfloat16, threads=1, codes=fast_topk.Int8Codes.of(keys))
        assert fast_topk.stats["int8_queries"] - before["int8_queries"] == 2 * 64
        assert fast_topk.stats["int8_fallback_queries"] - before["int8_fallback_queries"] == (2 * 64 if falls_back else 0)


@int8_only
def test_exact_memory_remembers_crowded_heads():
    """A (slot, head) that fell back skips the prefilter's probe on the next search, until its slot is reset
    or reprobe_every searches pass; results stay equal to the plain kernel's throughout."""
    g = torch.Generator().manual_seed(6)
    base = F.normalize(torch.randn(1, 2, 1, 64, generator=g), dim=-1)
    crowded = F.normalize(base + 1e-3 * torch.randn(1, 2, 8192, 64, generator=g), dim=-1)
    keys = torch.cat([crowded, F.normalize(torch.randn(1, 2, 8192, 64, generator=g), dim=-1)])  # slot 1: spread
    mem = ExactMemory(2, 2, 64, 8192, score_dtype=torch.float32, prefilter="int8")
    plain = ExactMemory(2, 2, 64, 8192, score_dtype=torch.float32, prefilter="none")
    for m in (mem, plain):
        m.add(keys, keys)
    q = F.normalize(torch.randn(2, 2, 32, 64, generator=g), dim=-1)
    for _ in range(2):
        assert torch.equal(mem.search(q, 8).indices.sort(-1).values, plain.search(q, 8).indices.sort(-1).values)
        assert mem._int8_ok.tolist() == [[0, 0], [1, 1]]
    mem.reset([0])
    assert mem._int8_ok.tolist() == [[1, 1], [1, 1]]


@int8_only
def test_int8_codes_follow_the_ring():
    """Codes are re-encoded where add writes (wrap, reset, partial chunks) and rebuilt on growth and load."""
    mem = ExactMemory(2, 2, 16, 300, dtype=torch.bfloat16, prefilter="int8")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 5, 16, generator=g)
    for step in range(12):
        x = torch.randn(2, 2, 37, 16, generator=g)
        mem.add(x, x)
        if step == 5:
            mem.reset([1])
        mem.search(q, 8)  # builds the codes on first use, then keeps them current
        want = fast_topk.Int8Codes.of(mem.keys)
        for f in ("codes", "scale", "err", "norm"):
            assert torch.equal(getattr(mem._codes, f), getattr(want, f)), (step, f)
    other = ExactMemory(2, 2, 16, 300, dtype=torch.bfloat16, prefilter="int8")
    other.load_state_dict(mem.state_dict())
    a, b = other.search(q, 8), mem.search(q, 8)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


@int8_only
def test_int8_codes_bound_the_error():
    """What the kernel relies on: k = scale * codes + r with |r| = err, |k| = norm, codes in [-127, 127],
    corr = -128 * sum(codes), and one scale per group of GROUP ring entries (the kernel's tile)."""
    N = 500  # not a multiple of GROUP: the last group is short
    keys = torch.randn(1, 2, N, 64) * torch.logspace(-4, 4, N)[:, None]
    keys[:, :, 24:36] = 0  # an all-zero group
    c = fast_topk.Int8Codes.of(keys)
    x, k = keys.double(), c.codes.double()
    assert c.codes.dtype == torch.int8 and k.abs().max() <= 127
    assert torch.equal(c.corr, -128 * c.codes.int().sum(-1))
    # err and norm are computed in double and rounded to fp32
    torch.testing.assert_close(c.err.double(), (x - c.scale.double()[..., None] * k).norm(dim=-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(c.norm.double(), x.norm(dim=-1), rtol=1e-6, atol=0)
    G = fast_topk.GROUP
    for g0 in range(0, N, G):
        grp = c.scale[..., g0:g0 + G]
        assert (grp == grp[..., :1]).all()
    assert (c.err <= 0.5 * c.scale * 8 * 1.0001).all()  # rounding error <= scale / 2 per dim, sqrt(64) = 8
    assert (c.err[:, :, 24:36] == 0).all() and (c.scale[:, :, 24:36] == 1).all()


def test_gather_rows_equals_index_select():
    table = torch.randn(1000, 3, 8).to(torch.bfloat16)
    rows = torch.randint(0, 1000, (777,))
    assert torch.equal(fast_topk.gather_rows(table, rows), table.index_select(0, rows))
    assert fast_topk.gather_rows(table, rows[:0]).shape == (0, 3, 8)
    with pytest.raises(IndexError, match=r"row ids must lie in \[0, 1000\)"):
        fast_topk.gather_rows(table, torch.tensor([3, 1000]))


@pytest.mark.parametrize("prefilter", PREFILTERS)
@pytest.mark.parametrize("ring_dtype", [torch.bfloat16, torch.float32])
def test_rows_gathered_by_the_kernel_are_the_ring_rows_at_the_returned_indices(prefilter, ring_dtype):
    # slot 1 holds fewer entries than k, so some results are invalid (index 0, its row 0); a wrapped ring
    fast, _ = build(2, 3, 16, 300, [420, 5], ring_dtype, torch.float32, seed=3, prefilter=prefilter)
    q = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(4))
    res = fast.search(q, 8)
    assert fast.active_path(q) == PATH[prefilter]
    b, h = torch.arange(2)[:, None, None, None], torch.arange(3)[None, :, None, None]
    assert torch.equal(res.keys, fast.keys[b, h, res.indices]) and torch.equal(res.values, fast.values[b, h, res.indices])
    assert torch.equal(res.positions, torch.where(res.valid, fast.positions[b, res.indices], -1))
    assert res.valid[0].all() and (~res.valid[1]).sum() == 3 * 40 * 3 and (res.indices[~res.valid] == 0).all()
    # the same rows from topk(values=...) directly, also when every (slot, head) falls back to the plain kernel
    for budget in (float("inf"), 0.0):
        codes = fast_topk.Int8Codes.of(fast.keys) if prefilter == "int8" else None
        s, i, k_rows, v_rows = fast_topk.topk(q, fast.keys, fast.count, 8, torch.float32, codes=codes,
                                              int8_budget=budget, values=fast.values)
        assert torch.equal(i, res.indices) and torch.equal(k_rows, res.keys) and torch.equal(v_rows, res.values)
    with pytest.raises(ValueError, match="values must be a contiguous ring like keys"):
        fast_topk.topk(q, fast.keys, fast.count, 8, torch.float32, values=fast.values[:, :2])
