"""Memory logits from the retrieval's scores (reuse) equal the recompute over the gathered keys, gradients included."""
import copy

import pytest
import torch
import torch.nn.functional as F

from memtrans import MemorizingTransformer, ModelConfig
from memtrans.memory import ExactMemory, make_memory
from memtrans.model import attention
from memtrans.model.attention import Attention, memory_logits_recompute, memory_logits_reuse

SEG = 16


def make(gate, qk_norm, knn_k=8, score_dtype="float32", backend="exact"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, depth=2, heads=2, head_dim=16, segment_len=SEG, memory_layers=(1,),
                      memory_size=64, knn_k=knn_k, gate=gate, qk_norm=qk_norm, memory_dtype="float32",
                      score_dtype=score_dtype, memory_backend=backend)
    model = MemorizingTransformer(cfg)
    with torch.no_grad():  # gates away from their symmetric init, so the memory term visibly matters
        for name, p in model.named_parameters():
            if "gate" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def last_segment(model, reuse, state, tokens, monkeypatch):
    """Loss, logits and gradients (parameters and the embedded input) of one segment on a copy of `state`."""
    monkeypatch.setattr(Attention, "reuse_scores", reuse)
    model.zero_grad(set_to_none=True)
    embedded = {}

    def keep(module, inputs, out):
        out.retain_grad()
        embedded["x"] = out

    handle = model.embed.register_forward_hook(keep)
    logits, _ = model(tokens[:, :-1], copy.deepcopy(state))
    handle.remove()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<embedded input>"] = embedded["x"].grad.clone()
    return logits.detach(), grads


def prefill(model, batch=2, segments=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(batch)
    with torch.no_grad():
        for _ in range(segments):
            _, state = model(torch.randint(0, 64, (batch, SEG), generator=g), state)
    return state, torch.randint(0, 64, (batch, SEG + 1), generator=g)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("gate", ["learned_scalar", "joint_softmax"])
def test_reuse_matches_recompute_outputs_and_gradients(gate, qk_norm, monkeypatch):
    model = make(gate, qk_norm)
    state, tokens = prefill(model)  # segments 1-2 fill the memory; segment 3 is compared
    assert len(state.memories[1]) == 2 * 2 * SEG
    calls = []
    reuse_fn = attention.memory_logits_reuse
    monkeypatch.setattr(attention, "memory_logits_reuse", lambda *a: calls.append(1) or reuse_fn(*a))
    out_reuse, g_reuse = last_segment(model, True, state, tokens, monkeypatch)
    assert calls, "the reuse path was not taken"
    n_calls = len(calls)
    out_ref, g_ref = last_segment(model, False, state, tokens, monkeypatch)
    assert len(calls) == n_calls, "the recompute path must not call the reuse function"

    torch.testing.assert_close(out_reuse, out_ref, rtol=1e-5, atol=1e-6)
    assert g_reuse.keys() == g_ref.keys()
    for name in ("blocks.1.attn.qkv.weight", "<embedded input>", "embed.weight"):
        assert g_ref[name].abs().sum() > 0, name
    if qk_norm:
        assert g_ref["blocks.1.attn.log_scale"].abs().sum() > 0
    for name in g_ref:
        assert torch.isfinite(g_reuse[name]).all(), name
        assert rel_err(g_reuse[name], g_ref[name]) < 1e-5, (name, rel_err(g_reuse[name], g_ref[name]))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_reuse_gradient_reaches_queries_through_memory(qk_norm):
    """Without the memory logits' gradient the queries' gradients differ: the test above can fail."""
    torch.manual_seed(3)
    mem = ExactMemory(1, 2, 16, 64, dtype=torch.float32, score_dtype=torch.float32)
    keys = F.normalize(torch.randn(1, 2, 40, 16), dim=-1)
    mem.add(keys, torch.randn(1, 2, 40, 16))
    q = torch.randn(1, 2, 5, 16)
    if qk_norm:
        q = F.normalize(q, dim=-1)
    q.requires_grad_(True)
    log_scale = torch.tensor([1.0, 1.5], requires_grad=True)
    found = mem.search(q, 8)
    w = torch.randn(1, 2, 5, 8)

    def grads(fn):
        scale = log_scale.exp()[:, None, None] if qk_norm else 0.25
        logits = fn(scale)
        (logits.float().softmax(-1) * w).sum().backward()
        out = (logits.detach(), q.grad.clone(), log_scale.grad.clone() if qk_norm else None)
        q.grad = log_scale.grad = None
        return out

    l_reuse, gq_reuse, gs_reuse = grads(lambda s: memory_logits_reuse(q, s, found))
    l_ref, gq_ref, gs_ref = grads(lambda s: memory_logits_recompute(q * s, found))
    torch.testing.assert_close(l_reuse, l_ref, rtol=1e-5, atol=1e-6)
    # atol 1e-6: the kernels' fp32 sums differ from the matmul's by summation order (the portable kernel has no
    # FMA: ~1 ulp per score), far below the ~1e-3 a missing memory-logit gradient would leave
    torch.testing.assert_close(gq_reuse, gq_ref, rtol=1e-5, atol=1e-6)
    assert gq_ref.abs().max() > 1e-3
    if qk_norm:
        torch.testing.assert_close(gs_reuse, gs_ref, rtol=1e-5, atol=1e-6)
        assert gs_ref.abs().max() > 1e-3


@pytest.mark.parametrize("gate", ["learned_scalar", "joint_softmax"])
def test_partly_filled_memory_gives_finite_equal_gradients(gate, monkeypatch):
    """Slot 0 holds 16 entries < k = 32 (half the retrieved entries invalid), slot 1 none at all."""
    model = make(gate, qk_norm=True, knn_k=32)
    state, tokens = prefill(model, segments=1)
    model.reset_state(state, [1])
    found = state.memories[1].search(torch.zeros(2, 2, 1, 16), 32)
    assert found.valid[0].sum(-1).eq(SEG).all() and not found.valid[1].any()
    out_reuse, g_reuse = last_segment(model, True, state, tokens, monkeypatch)
    out_ref, g_ref = last_segment(model, False, state, tokens, monkeypatch)
    assert torch.isfinite(out_reuse).all()
    torch.testing.assert_close(out_reuse, out_ref, rtol=1e-5, atol=1e-6)
    assert g_ref["blocks.1.attn.log_scale"].abs().sum() > 0
    for name in g_ref:
        assert torch.isfinite(g_reuse[name]).all(), name
        assert rel_err(g_reuse[name], g_ref[name]) < 1e-5, (name, rel_err(g_reuse[name], g_ref[name]))


def test_low_precision_scores_are_recomputed(monkeypatch):
    """bf16 scores are rounded, so the logits are recomputed from q and the retrieved keys."""
    calls = []
    monkeypatch.setattr(attention, "memory_logits_reuse", lambda *a: calls.append(1))
    model = make("learned_scalar", True, score_dtype="bfloat16")
    prefill(model)
    assert not calls


@pytest.mark.parametrize("backend,kw", [("exact", {}), ("faiss_flat", {}),
                                        ("faiss_ivf", dict(ivf_nlist=4, ivf_nprobe=2))])
def test_engine_scores_are_inner_products_of_the_returned_keys(backend, kw):
    """What reuse relies on: fp32 scores = q . key for each returned key, also for approximate IVF
    results and after the ring wrapped (FIFO overwrites); bf16 ring, bf16 and fp32 queries."""
    if backend != "exact":
        pytest.importorskip("faiss")
    for score_dtype in ("bfloat16", "float32"):  # faiss ignores score_dtype: its scores are exact either way
        cfg = ModelConfig(dim=32, heads=2, head_dim=16, memory_size=256, knn_k=8, memory_layers=(0,),
                          memory_backend=backend, memory_dtype="bfloat16", score_dtype=score_dtype, **kw)
        assert make_memory(cfg, batch_size=2).exact_scores == (backend != "exact" or score_dtype == "float32")
    mem = make_memory(cfg, batch_size=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # 300 entries into a 256 ring: wraps; IVF trains at the first search with >= 156 stored
        keys = F.normalize(torch.randn(2, 2, 100, 16, generator=g), dim=-1)
        mem.add(keys, keys)
    for dtype in (torch.float32, torch.bfloat16):
        q = F.normalize(torch.randn(2, 2, 16, 16, generator=g), dim=-1).to(dtype)
        found = mem.search(q, 8)
        if backend == "faiss_ivf":  # trained on first search: these results are approximate ones
            assert all(index is not None for slot in mem.indexes for index in slot)
        assert found.scores.dtype == torch.float32 and found.valid.any()
        ip = torch.einsum("bhtd,bhtkd->bhtk", q.float(), found.keys.float())
        torch.testing.assert_close(found.scores[found.valid], ip[found.valid], rtol=1e-6, atol=1e-6)
