"""The Memorizing Transformer: a pre-norm decoder-only transformer with a Transformer-XL cache in every
layer and kNN memory in the layers named by `ModelConfig.memory_layers`.

    model = MemorizingTransformer(cfg)
    state = model.init_state(batch_size=4)          # XL caches + memories, one slot per document
    logits, state = model(tokens, state)            # tokens [B, T], T <= segment_len
    state = model.reset_state(state, slots=[0, 2])  # a new document starts in slots 0 and 2

With `memory_layers=()` it is a Transformer-XL with everything else identical. A memory layer whose
memory is empty outputs the memory term 0, i.e. `(1 - g) * V_local` for the paper's gate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from memtrans.config import ModelConfig
from memtrans.memory import MemoryBackend, make_memory
from memtrans.memory.base import _as_index
from memtrans.model.attention import Attention
from memtrans.model.layers import FeedForward, RMSNorm


@dataclass
class ModelState:
    """What carries from one segment to the next, per document slot."""

    xl: list  # per layer: (keys, values) [B, H, T_prev, D] of the previous segment, or None
    xl_valid: torch.Tensor | None  # [B, T_prev] bool: False for slots whose document just started
    positions: torch.Tensor  # [B] long: tokens of the current document already seen per slot
    memories: dict[int, MemoryBackend] = field(default_factory=dict)  # layer index -> memory

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def state_dict(self) -> dict:
        return {"xl": [None if c is None else (c[0].cpu(), c[1].cpu()) for c in self.xl],
                "xl_valid": None if self.xl_valid is None else self.xl_valid.cpu(),
                "positions": self.positions.cpu(),
                "memories": {i: m.state_dict() for i, m in self.memories.items()}}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim or 4 * cfg.dim, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, xl, xl_valid, memory, positions, diagnostics):
        h, new_xl = self.attn(self.norm1(x), xl, xl_valid, memory, positions, diagnostics)
        x = x + self.dropout(h)
        return x + self.ffn(self.norm2(x)), new_xl


class MemorizingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # residual projections scaled down with depth (GPT-2)
            for w in (block.attn.proj.weight, block.ffn.down.weight):
                nn.init.normal_(w, std=0.02 / (2 * cfg.depth) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int) -> ModelState:
        return ModelState(xl=[None] * self.cfg.depth, xl_valid=None,
                          positions=torch.zeros(batch_size, dtype=torch.long, device=self.device),
                          memories={i: make_memory(self.cfg, batch_size, self.device) for i in self.cfg.memory_layers})

    def reset_state(self, state: ModelState, slots) -> ModelState:
        """A new document starts in `slots` (indices or bool mask): clear their XL cache and memories."""
        idx = _as_index(slots, state.batch_size).to(self.device)
        if len(idx):
            if state.xl_valid is not None:
                state.xl_valid[idx] = False
            state.positions[idx] = 0
            for memory in state.memories.values():
                memory.reset(idx.cpu())
        return state

    def load_state(self, d: dict, batch_size: int | None = None) -> ModelState:
        """Rebuild a ModelState from `ModelState.state_dict()` (e.g. to resume mid-document)."""
        state = self.init_state(batch_size or d["positions"].shape[0])
        if d["positions"].shape[0] != state.batch_size:
            raise ValueError(f"saved state has {d['positions'].shape[0]} slots, expected {state.batch_size}")
        if set(d["memories"]) != set(state.memories):
            raise ValueError(f"saved state has memory layers {sorted(d['memories'])}, "
                             f"this model has {sorted(state.memories)}")
        dev = self.device
        state.xl = [None if c is None else (c[0].to(dev), c[1].to(dev)) for c in d["xl"]]
        state.xl_valid = None if d["xl_valid"] is None else d["xl_valid"].to(dev)
        state.positions = d["positions"].to(dev)
        for i, m in state.memories.items():
            m.load_state_dict(d["memories"][i])
        return state

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None, diagnostics: dict | None = None):
        """tokens [B, T] -> (logits [B, T, vocab] float32, state advanced by T tokens).

        If `diagnostics` is a dict, each memory layer i fills `diagnostics[i]` (see Attention._diagnose).
        """
        B, T = tokens.shape
        if T > self.cfg.segment_len:
            raise ValueError(f"segment of {T} tokens is longer than segment_len={self.cfg.segment_len}")
        if state is None:
            state = self.init_state(B)
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} slots but tokens have batch size {B}")
        positions = state.positions[:, None] + torch.arange(T, device=tokens.device)[None, :]  # [B, T]
        x = self.embed(tokens)
        new_xl = []
        for i, block in enumerate(self.blocks):
            layer_diag = None
            if diagnostics is not None and i in state.memories:
                layer_diag = diagnostics.setdefault(i, {})
            xl = state.xl[i] if self.cfg.xl_cache else None
            x, kv = block(x, xl, state.xl_valid if xl is not None else None, state.memories.get(i), positions, layer_diag)
            new_xl.append(kv if self.cfg.xl_cache else None)
        logits = self.head(self.norm(x)).float()
        state.xl = new_xl
        state.xl_valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device) if self.cfg.xl_cache else None
        state.positions = state.positions + T
        return logits, state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
