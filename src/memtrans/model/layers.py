"""Building blocks: scale-only RMS norm, ReLU feed-forward, T5 relative position bias."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Scale-only RMS norm (no bias), as in T5 and the paper's model."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FeedForward(nn.Module):
    """ReLU MLP without biases."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.relu(self.up(x))))


def t5_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal (unidirectional) bucketing of distance = query_pos - key_pos >= 0.

    Half the buckets are exact small distances; the rest grow logarithmically up to max_distance,
    beyond which everything shares the last bucket.
    """
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.float() / exact + 1e-9) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, large)


class RelativePositionBias(nn.Module):
    """Learned scalar bias per (head, distance bucket), added to local attention logits only."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, heads)
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """Bias [H, q_len, k_len] where queries are the last q_len of the k_len key positions.

        The bias depends only on the distance, so it is looked up once per distance (q_len + k_len - 1 of them)
        and laid out as a Toeplitz matrix: row i is the window of the distance vector starting at
        q_len - 1 - i. Gathering per (query, key) pair instead made the embedding's backward cost ~5% of a
        training step."""
        key = (q_len, k_len, self.embedding.weight.device)
        buckets = self._cache.get(key)
        if buckets is None:
            # distances k_len - 1, k_len - 2, ..., -(q_len - 1): entry m is the distance of (i, j) with m = q_len - 1 - i + j
            rel = (k_len - 1) - torch.arange(q_len + k_len - 1, device=self.embedding.weight.device)
            buckets = t5_bucket(rel, self.num_buckets, self.max_distance)
            self._cache[key] = buckets
        per_distance = self.embedding(buckets).t()  # [H, q_len + k_len - 1]
        return per_distance.unfold(1, k_len, 1).flip(1)
