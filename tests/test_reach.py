"""The model's local reach (memtrans.model.reach) against the model: perturb one token, see which logits move."""
from __future__ import annotations

import pytest
import torch

from memtrans.config import ModelConfig
from memtrans.model import MemorizingTransformer
from memtrans.model.reach import can_reach, far_distance, local_reach

S = 8


def logits_over(model: MemorizingTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [N, vocab] of one document fed segment by segment, as the stream feeds it."""
    state = model.init_state(1)
    out = []
    with torch.no_grad():
        for i in range(0, tokens.shape[1], S):
            logits, state = model(tokens[:, i:i + S], state)
            out.append(logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("depth, xl", [(1, True), (2, True), (4, True), (2, False)])
def test_perturbing_one_token_moves_exactly_the_logits_within_reach(depth, xl):
    torch.manual_seed(depth)
    cfg = ModelConfig(vocab_size=32, dim=32, heads=2, head_dim=16, depth=depth, segment_len=S, memory_layers=(),
                      xl_cache=xl, memory_dtype="float32", score_dtype="float32")
    model = MemorizingTransformer(cfg).eval()
    n = S * (depth + 3)
    tokens = torch.randint(0, 32, (1, n))
    base = logits_over(model, tokens)
    furthest = 0
    for q in (0, 3, S - 1, S, 2 * S + 5):  # segment starts, middles and ends
        other = tokens.clone()
        other[0, q] = (other[0, q] + 1) % 32
        moved = (logits_over(model, other) - base).abs().amax(-1) > 1e-6
        changed = {p for p in range(n) if moved[p]}
        assert changed == {p for p in range(n) if can_reach(q, p, S, depth, xl)}, (q, sorted(changed))
        furthest = max(furthest, max(changed) - q)
    # the bound is attained (q at a segment start) and is the formula: S * (L + 1) - 1 with the cache, S - 1 without
    assert furthest == local_reach(S, depth, xl) == (S * (depth + 1) - 1 if xl else S - 1)
    assert far_distance(S, depth, xl) == furthest + 2
