"""Attention over the local window (segment + Transformer-XL cache), optionally augmented with kNN memory.

A memory layer retrieves, per head and query, the top-k (key, value) pairs of earlier segments of the
same document, attends to them with their own softmax (no position bias), and combines the result with
local attention through a gate (`ModelConfig.gate`). Retrieval happens before the segment's own keys
and values are written, and written entries are detached: no gradient flows through stored memories.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from memtrans.config import ModelConfig
from memtrans.memory import MemoryBackend, SearchResult
from memtrans.model.layers import RelativePositionBias

# log2-spaced bins for "how far back does retrieval reach": [0,1), [1,2), [2,4), ..., [2^24, inf)
DISTANCE_EDGES = torch.tensor([0] + [2 ** i for i in range(25)])


class _ReusedScores(torch.autograd.Function):
    """The retrieval's raw scores q.k as a differentiable function of q.

    forward(q, scores, keys, valid) -> scores (0 where invalid, so a later scale multiply stays finite);
    backward: d/dq = sum_k grad_k * key_k over valid entries (the gradient of q.k), nothing to the others.
    """

    @staticmethod
    def forward(ctx, q, scores, keys, valid):
        ctx.save_for_backward(keys, valid)
        ctx.q_dtype = q.dtype
        return scores.masked_fill(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad):
        keys, valid = ctx.saved_tensors
        grad = grad.masked_fill(~valid, 0.0).to(keys.dtype)
        return torch.einsum("bhtk,bhtkd->bhtd", grad, keys).to(ctx.q_dtype), None, None, None


def memory_logits_recompute(q_scaled: torch.Tensor, found: SearchResult) -> torch.Tensor:
    """Logits [B, H, T, k] of the retrieved keys, recomputed with autograd from the scaled queries (reference)."""
    return torch.einsum("bhtd,bhtkd->bhtk", q_scaled, found.keys.to(q_scaled.dtype))


def memory_logits_reuse(q: torch.Tensor, scale, found: SearchResult) -> torch.Tensor:
    """The same logits (float32) from the retrieval's scores: found.scores * scale, with the gradient of
    (q * scale) . key to q and to the scale. q is the unscaled query the memory was searched with; scale is
    a float or a tensor broadcasting against [B, H, T, k]. Invalid entries give logit 0 and no gradient."""
    s = _ReusedScores.apply(q, found.scores, found.keys.to(q.dtype), found.valid)
    return s * scale


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim ignoring invalid entries; rows with no valid entry give all zeros (no NaN)."""
    any_valid = valid.any(-1, keepdim=True)
    logits = logits.masked_fill(~valid, float("-inf")).masked_fill(~any_valid, 0.0)
    return logits.float().softmax(-1) * any_valid


class KVWindow:
    """One layer's local window in incremental decoding (MemorizingTransformer.extend): keys and values
    [B, H, capacity, D] allocated once per segment (capacity = XL cache + segment_len), of which the first
    `filled` are in use. Each call writes its new keys/values in place and attends over a view of the filled
    part: the same keys, values and logits as concatenating the window with them, without a copy of the
    window per token (which, twice per layer, was a third of the decoding time)."""

    def __init__(self, capacity: int, prefix: tuple | None = None):
        self.capacity = capacity
        self.prefix = prefix  # (keys, values) [B, H, T0, D] the window starts with, until the buffers exist
        self.keys = self.values = None
        self.filled = 0 if prefix is None else prefix[0].shape[2]
        if self.filled > capacity:
            raise ValueError(f"a window of capacity {capacity} cannot start with {self.filled} keys")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] after the filled part; returns views (keys, values) [B, H, filled, D]."""
        B, H, T, D = k.shape
        end = self.filled + T
        if end > self.capacity:
            raise ValueError(f"{T} new keys overflow the window ({self.filled} of {self.capacity} filled)")
        if self.keys is None:  # the first tokens of the segment: allocate in the keys' dtype, copy the XL cache
            self.keys, self.values = k.new_empty(B, H, self.capacity, D), v.new_empty(B, H, self.capacity, D)
            if self.prefix is not None:
                self.keys[:, :, :self.filled].copy_(self.prefix[0])
                self.values[:, :, :self.filled].copy_(self.prefix[1])
            self.prefix = None
        elif self.keys.dtype != k.dtype:  # autocast switched mid-segment: the window follows, as a concatenation would
            self.keys, self.values = self.keys.to(k.dtype), self.values.to(v.dtype)
        self.keys[:, :, self.filled:end].copy_(k)
        self.values[:, :, self.filled:end].copy_(v)
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def filled_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) [B, H, filled, D] in use (views), or None for an empty window."""
        if self.keys is None:
            return self.prefix
        return self.keys[:, :, :self.filled], self.values[:, :, :self.filled]


class Attention(nn.Module):
    # Reuse the retrieval's scores as the memory logits when they are fp32 inner products (see _with_memory);
    # False always recomputes them (the reference path the tests compare against).
    reuse_scores = True

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        H, D = cfg.heads, cfg.head_dim
        self.heads, self.head_dim, self.knn_k = H, D, cfg.knn_k
        self.qkv = nn.Linear(cfg.dim, 3 * H * D, bias=False)
        self.proj = nn.Linear(H * D, cfg.dim, bias=False)
        self.rel_bias = RelativePositionBias(H, cfg.rel_pos_buckets, cfg.rel_pos_max_distance)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            # Learned per-head logit scale on L2-normalised q, k, kept in log space so it stays positive.
            # Init sqrt(head_dim): the logits then spread like those of standard 1/sqrt(d) attention at
            # init, so the qk_norm ablation changes the normalisation, not the starting temperature.
            self.log_scale = nn.Parameter(torch.full((H,), 0.5 * math.log(D)))
        self.use_memory = layer in cfg.memory_layers
        self.gate = cfg.gate if self.use_memory else None
        if self.gate == "learned_scalar":
            self.gate_bias = nn.Parameter(torch.zeros(H))  # g = sigmoid(0) = 0.5 at init
        elif self.gate == "fixed":
            self.register_buffer("fixed_gate", torch.tensor(cfg.fixed_gate), persistent=False)
        elif self.gate == "weighted_sum":
            self.gate_mem = nn.Parameter(torch.full((H,), 0.5))
            self.gate_local = nn.Parameter(torch.full((H,), 0.5))
        elif self.gate == "concat":
            eye = torch.eye(D).expand(H, D, D)
            self.gate_proj = nn.Parameter(torch.cat([eye, eye], -1) * 0.5)  # [H, D_out, 2D]: the average at init
        elif self.gate == "token_gate":
            self.gate_weight = nn.Parameter(torch.zeros(H, cfg.dim))
            self.gate_bias = nn.Parameter(torch.zeros(H))

    def forward(self, x: torch.Tensor, xl: tuple | None, xl_valid: torch.Tensor | None,
                memory: MemoryBackend | None, positions: torch.Tensor, diagnostics: dict | None = None,
                write_memory: bool = True):
        """x [B, T, dim] -> (out [B, T, dim], (k, v) of these T tokens for the next segment's XL cache).

        `xl` holds the keys/values that precede these T queries in the local window: the previous segment's
        (the XL cache, a (keys, values) pair) in training; in incremental decoding (MemorizingTransformer.extend)
        a KVWindow holding the XL cache followed by the current segment's earlier tokens, to which these T
        tokens' keys/values are written in place; `xl_valid` then covers the whole window, these T included.
        The queries are the last T of the window, so the causal mask and the T5 bias are the same as in one
        forward over the whole segment.
        `write_memory=False` retrieves without writing (the caller writes the segment once it is complete)."""
        B, T, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
            q_scaled = q * self.log_scale.exp().to(q.dtype)[:, None, None]
        else:
            q_scaled = q / math.sqrt(self.head_dim)

        # Local window: XL cache of the previous segment (if any) + this segment, causal, T5 bias.
        # xl_valid None: every cached key is valid (the caller knows it on the host: no slot was reset since).
        if isinstance(xl, KVWindow):  # decoding: written in place, the window's filled part attended
            keys, values = xl.append(k, v)
            key_valid = xl_valid  # [B, L]: already covers these T tokens
        elif xl is not None:
            keys, values = torch.cat([xl[0].to(k.dtype), k], 2), torch.cat([xl[1].to(v.dtype), v], 2)
            key_valid = None if xl_valid is None else torch.cat([xl_valid, xl_valid.new_ones(B, T)], 1)
        else:
            keys, values, key_valid = k, v, None
        L = keys.shape[2]
        # Additive mask in q's dtype: T5 bias, -inf where not allowed. [1, H, T, L] while every key is valid
        # (almost every segment): a per-slot [B, H, T, L] copy costs as much as the attention itself on CPU.
        # Whether a mask is needed is decided on the host (no bool() of a device tensor: no sync per layer);
        # a single query with every key valid (decoding) sees the whole window: the bias alone.
        bias = self.rel_bias(T, L).to(q.dtype)[None]  # [1, H, T, L]
        if T > 1 or key_valid is not None:
            allowed = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)[None, None]  # [1, 1, T, L]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, None, :]  # [B, 1, T, L]
            bias = bias.masked_fill(~allowed, float("-inf"))

        if self.use_memory:
            out = self._with_memory(x, q, q_scaled, keys, values, bias, memory, positions, diagnostics)
            if write_memory:
                memory.add(k.detach(), v.detach(), positions)  # written only after this segment's retrieval
        else:
            out = F.scaled_dot_product_attention(q_scaled, keys, values, attn_mask=bias, scale=1.0)
        out = self.proj(rearrange(out, "b h t d -> b t (h d)"))
        return out, (k.detach(), v.detach())

    @torch.compiler.disable  # retrieval, reuse and gating stay eager under train.compile (see README)
    def _with_memory(self, x, q, q_scaled, keys, values, bias, memory, positions, diagnostics):
        found = memory.search(q, self.knn_k)  # ranks by raw q.k; a positive per-head scale keeps the order
        mem_values = found.values.to(values.dtype)
        # Gradients reach q (and the scale) through the retrieved logits; none reach the memory. Where the
        # retrieval already computed fp32 q.k for exactly these keys (memory.exact_scores), they are reused;
        # bf16/fp16 scores (ExactMemory's score_dtype) are rounded, so the logits are recomputed.
        if self.reuse_scores and memory.exact_scores:
            scale = self.log_scale.exp()[:, None, None] if self.qk_norm else 1 / math.sqrt(self.head_dim)
            mem_logits = memory_logits_reuse(q, scale, found)
        else:
            mem_logits = memory_logits_recompute(q_scaled, found)
        if self.gate == "joint_softmax":  # one softmax over local and retrieved keys
            local_logits = torch.matmul(q_scaled, keys.transpose(-1, -2)).float() + bias.float()
            valid = torch.cat([torch.isfinite(bias).expand_as(local_logits), found.valid], -1)
            p = masked_softmax(torch.cat([local_logits, mem_logits.float()], -1), valid)
            L = keys.shape[2]
            local_term = torch.matmul(p[..., :L].to(values.dtype), values)
            mem_term = torch.einsum("bhtk,bhtkd->bhtd", p[..., L:].to(mem_values.dtype), mem_values)
        else:
            local = F.scaled_dot_product_attention(q_scaled, keys, values, attn_mask=bias, scale=1.0)
            p = masked_softmax(mem_logits, found.valid)
            mem = torch.einsum("bhtk,bhtkd->bhtd", p.to(mem_values.dtype), mem_values)
            mem_term, local_term = self._gate(x, mem, local)
        if diagnostics is not None:
            self._diagnose(diagnostics, found, p, mem_term, local_term, positions, keys.shape[2])
        return mem_term + local_term

    def _gate(self, x, mem, local):
        """(memory term, local term) whose sum is the layer output; with an empty memory mem is 0."""
        if self.gate in ("learned_scalar", "fixed"):
            g = torch.sigmoid(self.gate_bias) if self.gate == "learned_scalar" else self.fixed_gate
            g = g.to(mem.dtype).reshape(-1, 1, 1)
            return g * mem, (1 - g) * local
        if self.gate == "token_gate":  # content-dependent: g = sigmoid(w_h . x + b_h) per head and token
            g = torch.sigmoid(torch.einsum("btc,hc->bht", x, self.gate_weight.to(x.dtype)) + self.gate_bias.to(x.dtype)[:, None])
            return g[..., None] * mem, (1 - g[..., None]) * local
        if self.gate == "weighted_sum":
            return self.gate_mem.to(mem.dtype).reshape(-1, 1, 1) * mem, self.gate_local.to(local.dtype).reshape(-1, 1, 1) * local
        if self.gate == "concat":  # per head, a learned linear map of [V_mem ; V_local] (2D -> D)
            W = self.gate_proj.to(mem.dtype)
            D = self.head_dim
            return torch.einsum("bhtd,hed->bhte", mem, W[..., :D]), torch.einsum("bhtd,hed->bhte", local, W[..., D:])
        raise AssertionError(self.gate)

    @torch.no_grad()
    def _diagnose(self, diagnostics, found, p, mem_term, local_term, positions, local_len):
        """Per-head gate value, share of the output coming from memory, and retrieval distances; per query
        the retrieved entries' document positions and attention weights, and the memory share."""
        has_mem = found.valid.any(-1)  # [B, H, T]
        n = has_mem.sum((0, 2)).clamp(min=1)
        if self.gate == "joint_softmax":
            mem_weights = p[..., local_len:]  # share of the joint softmax mass on each retrieved entry
            share = mem_weights.sum(-1)
        else:
            mem_weights = p  # the memory attention's own softmax over the retrieved entries
            m, l_ = mem_term.float().norm(dim=-1), local_term.float().norm(dim=-1)
            share = m / (m + l_).clamp(min=1e-12)
        gate = {"learned_scalar": lambda: torch.sigmoid(self.gate_bias),
                "fixed": lambda: self.fixed_gate.expand(self.heads),
                "weighted_sum": lambda: self.gate_mem,
                }.get(self.gate)
        q_pos = positions[:, None, :, None]  # [B, 1, T, 1]
        # Summaries on the device, one copy to the host (one synchronisation per layer, not one per summary).
        edges = DISTANCE_EDGES.to(positions.device)
        hist = (torch.bucketize(q_pos - found.positions, edges, right=True) - 1).clamp(0, len(edges) - 1)
        counts = torch.zeros(len(edges), dtype=torch.long, device=positions.device)
        counts.scatter_add_(0, hist.flatten(), found.valid.flatten().long())  # valid retrievals per distance bin
        H = self.heads
        g = gate().detach().double() if gate else torch.zeros(0, dtype=torch.float64, device=positions.device)
        host = torch.cat([((share * has_mem).sum((0, 2)) / n).double(), g.to(positions.device),
                          has_mem.sum().double()[None], counts.double()]).cpu()
        diagnostics.update({
            "memory_share": host[:H].float(),  # [H]
            "gate": host[H:H + len(g)].float() if gate else None,  # [H] or None where no scalar gate exists
            "queries_with_memory": int(host[H + len(g)]),
            "distance_counts": host[H + len(g) + 1:].long(),  # [len(DISTANCE_EDGES)]
            # per query, on the model's device: [B, H, T, k] positions (-1 invalid) and weights, [B, H, T] share
            "retrieved_positions": found.positions,
            "retrieved_weights": mem_weights.float() * found.valid,
            "token_memory_share": (share * has_mem).float(),
        })
