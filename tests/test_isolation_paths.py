"""Isolation on every retrieval path: a document's logits do not depend on what the other slots hold, nor on what
ran in its slot before a reset, whichever kernel (or the torch reference) the machine takes."""
import pytest
import torch

from memtrans import MemorizingTransformer, ModelConfig
from memtrans.memory import ExactMemory, fast_topk

SEG = 8
PATHS = fast_topk.runnable_isas() + ["reference"]


@pytest.fixture(params=PATHS)
def retrieval_path(request, monkeypatch):
    path = request.param
    if path == "reference":
        monkeypatch.setattr(ExactMemory, "use_fast", False)
    else:
        assert fast_topk.use_isa(path) == path
    from conftest import record_retrieval_path
    record_retrieval_path(f"isolation-{path}")
    yield path
    fast_topk.use_isa(None)


def run(model, docs, state):
    out = []
    for s in range(0, docs.shape[1], SEG):
        logits, state = model(docs[:, s:s + SEG], state)
        out.append(logits)
    return torch.cat(out, 1), state


@pytest.mark.parametrize("memory_size", [24, 512])  # wrapped; unwrapped, where other slots hold more entries
@pytest.mark.parametrize("score_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("gate,qk_norm", [("fixed", False), ("concat", False), ("learned_scalar", True)])
def test_logits_do_not_depend_on_other_slots(retrieval_path, score_dtype, gate, qk_norm, memory_size):
    torch.manual_seed(0)
    # bf16 entries: crowded scores, where scores rounded to bf16 used to tie
    model = MemorizingTransformer(ModelConfig(vocab_size=16, dim=32, depth=2, heads=2, head_dim=16, segment_len=SEG,
                                              memory_layers=(1,), memory_size=memory_size, knn_k=4, gate=gate, qk_norm=qk_norm,
                                              memory_dtype="bfloat16", score_dtype=score_dtype)).eval()
    if retrieval_path != "reference":
        assert model.init_state(1).memories[1].active_path().startswith("fused")
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 16, (1, 6 * SEG), generator=g)
    with torch.no_grad():
        alone, _ = run(model, target, model.init_state(1))
        # other documents of other lengths ran in slots 1 and 2 (and in slot 0 before a reset)
        _, state = run(model, torch.randint(0, 16, (3, 5 * SEG), generator=g), model.init_state(3))
        state = model.reset_state(state, [0])
        batch = torch.cat([target, torch.randint(0, 16, (2, 6 * SEG), generator=g)], 0)
        mixed, _ = run(model, batch, state)
    torch.testing.assert_close(mixed[:1], alone, rtol=0, atol=1e-5)
