"""How far back a token can influence a logit without the kNN memory: the model's local reach.

Every layer attends causally within its segment and, with the Transformer-XL cache, to the whole previous
segment *at that layer's input*. So a layer moves information back by at most one segment boundary, and a
depth-L model by L boundaries: the logits at position p (document positions, segments of S tokens starting at
0, as the stream cuts them) can depend on the token at q <= p exactly when

    p // S - q // S <= L   (with the XL cache; without it, p // S == q // S)

The largest such p - q is S * (L + 1) - 1 (q at the start of a segment, p at the end of the L-th after it);
without the cache it is S - 1. `tests/test_reach.py` perturbs one token of a random model and finds the furthest
logit that changes, which equals this bound at every depth it tries.

A recall query whose value is the target at position t (predicted by the logits at t - 1) and whose binding
lies d tokens earlier (at t - d) can be answered locally only if d - 1 <= reach; `far_distance` is the smallest
d beyond that. Pure Python: the data layer, the plan resolver and the report use it without building a model.
"""
from __future__ import annotations


def local_reach(segment_len: int, depth: int, xl_cache: bool = True) -> int:
    """The largest p - q for which the token at q can change the logits at p without memory (in tokens)."""
    if segment_len < 1 or depth < 1:
        raise ValueError(f"segment_len and depth must be positive, got {segment_len} and {depth}")
    return segment_len * (depth + 1) - 1 if xl_cache else segment_len - 1


def can_reach(q: int, p: int, segment_len: int, depth: int, xl_cache: bool = True) -> bool:
    """Whether the token at document position q can change the logits at position p (segments aligned at 0)."""
    if q > p:
        return False
    return p // segment_len - q // segment_len <= (depth if xl_cache else 0)


def far_distance(segment_len: int, depth: int, xl_cache: bool = True) -> int:
    """The smallest recall distance d (target position - binding position) that no local path bridges."""
    return local_reach(segment_len, depth, xl_cache) + 2


def of_model(model_cfg) -> dict:
    """{reach, far_distance, segment_len, depth, xl_cache} of a ModelConfig (or its dict), for records and messages."""
    get = (lambda k: model_cfg[k]) if isinstance(model_cfg, dict) else (lambda k: getattr(model_cfg, k))
    s, L, xl = int(get("segment_len")), int(get("depth")), bool(get("xl_cache"))
    return {"reach": local_reach(s, L, xl), "far_distance": far_distance(s, L, xl), "segment_len": s, "depth": L,
            "xl_cache": xl}


def describe(model_cfg) -> str:
    """'segment 32 x (depth 2 + 1) - 1 = 95 tokens (XL cache)' for messages and reports."""
    r = of_model(model_cfg)
    if r["xl_cache"]:
        return f"{r['reach']} tokens (model.segment_len {r['segment_len']} x (model.depth {r['depth']} + 1) - 1, XL cache)"
    return f"{r['reach']} tokens (model.segment_len {r['segment_len']} - 1, no XL cache)"


__all__ = ["local_reach", "can_reach", "far_distance", "of_model", "describe"]
