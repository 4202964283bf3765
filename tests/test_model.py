"""Model correctness: causality (through memory too), isolation, empty/no memory, gradients, determinism."""
import pytest
import torch

from memtrans import MemorizingTransformer, ModelConfig
from memtrans.config import GATES

SEG = 8


def make(gate="learned_scalar", qk_norm=True, memory_layers=(1,), seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=32, dim=32, depth=3, heads=2, head_dim=16, segment_len=SEG, memory_layers=memory_layers,
                memory_size=64, knn_k=4, gate=gate, qk_norm=qk_norm, memory_dtype="float32", score_dtype="float32")
    args.update(kw)
    model = MemorizingTransformer(ModelConfig(**args))
    # Make every gate mix memory in visibly (at init several gates are exact averages of the same thing).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def run_document(model, docs, state=None):
    """Stream documents [B, L] segment by segment; return logits [B, L, V]."""
    state = state or model.init_state(docs.shape[0])
    out = []
    for s in range(0, docs.shape[1], SEG):
        logits, state = model(docs[:, s:s + SEG], state)
        out.append(logits)
    return torch.cat(out, 1), state


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_causality_through_memory_and_xl(gate, qk_norm):
    model = make(gate, qk_norm)
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 32, (2, 5 * SEG), generator=g)
    base, _ = run_document(model, doc)
    for t in (3, SEG + 5, 3 * SEG):  # inside a segment, mid-document, first token of a segment
        changed = doc.clone()
        changed[:, t] = (changed[:, t] + 1) % 32
        out, _ = run_document(model, changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"position {t} leaked into earlier logits"
        assert not torch.allclose(out[:, t:], base[:, t:]), "the change should affect later logits"


def test_memory_reaches_beyond_xl_window_and_no_memory_does_not():
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(0, 32, (1, 5 * SEG), generator=g)
    changed = doc.clone()
    # Segment 0. Each layer's XL cache reaches one segment further back, so with depth 3 segment 4
    # is out of reach of segment 0 without memory.
    changed[0, 2] += 1
    for layers, expect_change in (((), False), ((1,), True)):
        model = make(memory_layers=layers)
        a, _ = run_document(model, doc)
        b, _ = run_document(model, changed)
        moved = not torch.allclose(a[:, 4 * SEG:], b[:, 4 * SEG:])
        assert moved == expect_change, f"memory_layers={layers}"


def test_no_memory_model_has_no_memories_and_no_gate_parameters():
    model = make(memory_layers=())
    state = model.init_state(2)
    assert state.memories == {}
    assert not [n for n, _ in model.named_parameters() if "gate" in n]


@pytest.mark.parametrize("gate", GATES)
def test_empty_memory_layer_outputs_documented_local_share(gate):
    """With nothing stored, a memory layer outputs the local term alone: (1-g)*V_local for the paper's gate."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, dim=32, depth=2, heads=2, head_dim=16, segment_len=SEG, memory_size=64, knn_k=4,
               gate=gate, memory_dtype="float32", score_dtype="float32")
    with_mem = MemorizingTransformer(ModelConfig(memory_layers=(0,), **cfg))
    without = MemorizingTransformer(ModelConfig(memory_layers=(), **cfg))
    without.load_state_dict(with_mem.state_dict(), strict=False)
    x = torch.randn(2, SEG, 32)
    state = with_mem.init_state(2)
    pos = torch.arange(SEG).expand(2, SEG)
    out_mem, _ = with_mem.blocks[0].attn(x, None, None, state.memories[0], pos)
    out_local, _ = without.blocks[0].attn(x, None, None, None, pos)
    expected = {"joint_softmax": 1.0}.get(gate, 0.5)  # every other gate starts at an even mix
    torch.testing.assert_close(out_mem, expected * out_local, rtol=1e-5, atol=1e-6)
    assert len(state.memories[0]) == 2 * SEG  # the segment was written after retrieval


@pytest.mark.parametrize("gate", GATES)
def test_gradients_reach_every_parameter_but_not_through_memory(gate):
    model = make(gate).train()
    doc = torch.randint(0, 32, (2, 4 * SEG), generator=torch.Generator().manual_seed(3))
    state = model.init_state(2)
    captured = {}
    handle = model.embed.register_forward_hook(lambda m, i, o: captured.setdefault("emb", []).append(o))
    for s in range(0, 3 * SEG, SEG):
        logits, state = model(doc[:, s:s + SEG], state)
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), doc[:, 2 * SEG + 1:3 * SEG + 1].flatten())
    earlier = captured["emb"][1]  # segment 1 produced memory entries that segment 2 retrieves
    grads = torch.autograd.grad(loss, [earlier] + list(model.parameters()), allow_unused=True)
    assert grads[0] is None, "gradient flowed into an earlier segment through memory or XL cache"
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n, gr in zip(names, grads[1:]) if gr is None or not gr.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    for memory in state.memories.values():
        assert not memory.keys.requires_grad and not memory.values.requires_grad


def test_isolation_across_slots_and_after_reset():
    model = make()
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, 32, (1, 4 * SEG), generator=g)
    # Reference: the target document alone, fresh state.
    ref, _ = run_document(model, target)
    # Same document in slot 1 after another document ran there, with other documents in slot 0.
    other = torch.randint(0, 32, (2, 3 * SEG), generator=g)
    _, state = run_document(model, other)
    state = model.reset_state(state, [1])
    batch = torch.cat([torch.randint(0, 32, (1, 4 * SEG), generator=g), target], 0)
    out, _ = run_document(model, batch, state)
    torch.testing.assert_close(out[1:], ref, rtol=0, atol=1e-5)


def test_reset_with_bool_mask_and_positions():
    model = make()
    _, state = run_document(model, torch.randint(0, 32, (2, 2 * SEG)))
    assert state.positions.tolist() == [2 * SEG, 2 * SEG]
    state = model.reset_state(state, torch.tensor([False, True]))
    assert state.positions.tolist() == [2 * SEG, 0]
    assert state.memories[1].count.tolist() == [2 * SEG, 0]
    assert state.xl_valid[1].sum() == 0 and state.xl_valid[0].all()


def test_determinism_same_seed_same_logits():
    doc = torch.randint(0, 32, (2, 3 * SEG), generator=torch.Generator().manual_seed(5))
    a, _ = run_document(make(seed=7), doc)
    b, _ = run_document(make(seed=7), doc)
    c, _ = run_document(make(seed=8), doc)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_state_save_and_restore_mid_document():
    model = make()
    doc = torch.randint(0, 32, (2, 4 * SEG), generator=torch.Generator().manual_seed(6))
    full, _ = run_document(model, doc)
    _, state = run_document(model, doc[:, :2 * SEG])
    restored = model.load_state(state.state_dict())
    rest, _ = run_document(model, doc[:, 2 * SEG:], restored)
    assert torch.equal(rest, full[:, 2 * SEG:])


def test_faiss_flat_backend_gives_same_logits_as_exact():
    doc = torch.randint(0, 32, (2, 4 * SEG), generator=torch.Generator().manual_seed(9))
    a, _ = run_document(make(memory_backend="exact"), doc)
    b, _ = run_document(make(memory_backend="faiss_flat"), doc)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_runs_and_is_close():
    model = make()
    doc = torch.randint(0, 32, (2, 3 * SEG), generator=torch.Generator().manual_seed(10))
    ref, _ = run_document(model, doc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = run_document(model, doc)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1


def test_segment_too_long_and_batch_mismatch_raise():
    model = make()
    with pytest.raises(ValueError, match="segment_len"):
        model(torch.zeros(1, SEG + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="slots"):
        model(torch.zeros(3, SEG, dtype=torch.long), model.init_state(2))


def test_diagnostics_are_filled_for_memory_layers():
    model = make(memory_layers=(0, 2))
    state = model.init_state(2)
    doc = torch.randint(0, 32, (2, 3 * SEG))
    for s in range(0, 3 * SEG, SEG):
        diag = {}
        _, state = model(doc[:, s:s + SEG], state, diagnostics=diag)
    assert set(diag) == {0, 2}
    d = diag[2]
    assert d["memory_share"].shape == (2,) and ((d["memory_share"] > 0) & (d["memory_share"] < 1)).all()
    assert d["gate"].shape == (2,)
    assert d["distance_counts"].sum() == 2 * 2 * SEG * 4  # B * H * T * k valid retrievals
    assert d["distance_counts"][0] == 0  # nothing retrieved from the current position or later


# ---- on every available device (benchmarks/gpu_check.sh runs these on CUDA) -------------------------------------
import os  # noqa: E402

DEVICES = [os.environ["MEMTRANS_TEST_DEVICE"]] if os.environ.get("MEMTRANS_TEST_DEVICE") else (
    ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate", ["learned_scalar", "joint_softmax"])
def test_causality_and_isolation_on_device(device, gate):
    """On `device`: no position leaks into earlier logits (through memory and XL), and a slot's logits do not
    depend on another slot's document, with a reset in the other slot mid-stream."""
    model = make(gate).to(device)
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 32, (2, 5 * SEG), generator=g)

    def run(d):
        state, out = model.init_state(2), []
        for i, s in enumerate(range(0, d.shape[1], SEG)):
            if i == 2:
                model.reset_state(state, [1])
            out.append(model(d[:, s:s + SEG].to(device), state)[0].cpu())
        return torch.cat(out, 1)

    base = run(doc)
    t = SEG + 3
    changed = doc.clone()
    changed[0, t] = (changed[0, t] + 1) % 32
    out = run(changed)
    assert torch.equal(out[0, :t], base[0, :t]) and not torch.allclose(out[0, t:], base[0, t:])
    other = doc.clone()
    other[1] = torch.randint(0, 32, (5 * SEG,), generator=g)
    torch.testing.assert_close(run(other)[0], base[0], rtol=1e-5, atol=1e-5)
