"""The document stream: B slots, each reading one document in order, segment after segment.

- Every slot holds one document and yields its tokens `segment_len` at a time; `targets` are the next
  tokens, so a document of L tokens gives L - 1 predictions over ceil((L - 1) / T) segments. The last
  segment is padded (token 0) with `loss_mask` False. `positions[b]` is the offset of `tokens[b, 0]`
  in its document.
- When a slot's document ends, the slot takes the next document of the order and `new_doc[b]` is True
  in the batch holding that document's first segment (also on the very first batch). The caller resets
  that slot's model state (XL cache and memory) before the forward pass.
- Documents are never shuffled inside. The order of documents is a permutation by `seed`, a fresh
  one per epoch when `loop=True` (`shuffle=False` keeps the index order).
- `loop=False` (evaluation): every document of the rank is read exactly once; a slot that finds no
  document left becomes idle (`doc_index` -1, `loss_mask` all False, `new_doc` False) and iteration
  stops when all slots are idle.
- `rank`/`world_size`: rank r reads the documents whose index % world_size == r.
- Documents shorter than 2 tokens (nothing to predict) are skipped.
- `state_dict()` / `load_state_dict()` resume exactly, mid-document included.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

_NEEDS_DOC = -2  # slot state: must take the next document before the next batch
_IDLE = -1


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] bool
    new_doc: torch.Tensor  # [B] bool
    doc_index: torch.Tensor  # [B] long, -1 = idle slot
    positions: torch.Tensor  # [B] long
    tags: torch.Tensor  # [B, T] long, -1 where none

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())


class DocumentStream:
    """Iterator of `Batch` over a `TokenizedDocs` (anything with `len()`, `tokens(i)`, `tags(i)`)."""

    def __init__(self, docs, batch_size: int, segment_len: int, seed: int = 0, loop: bool = True,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if batch_size < 1 or segment_len < 1:
            raise ValueError(f"batch_size and segment_len must be positive, got {batch_size}, {segment_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in 0..world_size-1, got rank={rank}, world_size={world_size}")
        self.docs = docs
        self.batch_size, self.segment_len = batch_size, segment_len
        self.seed, self.loop, self.rank, self.world_size, self.shuffle = seed, loop, rank, world_size, shuffle
        lengths = getattr(docs, "lengths", None)
        if lengths is None:
            lengths = np.array([len(docs.tokens(i)) for i in range(len(docs))], dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        idx = np.arange(len(docs))
        self.owned = idx[(idx % world_size == rank) & (self._lengths >= 2)]
        if loop and len(self.owned) == 0:
            raise ValueError(f"DocumentStream: rank {rank} of {world_size} has no document with >= 2 tokens "
                             f"({len(docs)} documents in all)")
        self._has_tags = bool(getattr(docs, "has_tags", True)) and len(docs) > 0 and docs.tags(0) is not None
        self.epoch = 0
        self.cursor = 0
        self.batches = 0
        self._order = self._make_order(0)
        self.slot_doc = np.full(batch_size, _NEEDS_DOC, dtype=np.int64)
        self.slot_pos = np.zeros(batch_size, dtype=np.int64)

    def _make_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.owned
        return np.random.default_rng([self.seed, epoch, 12345]).permutation(self.owned)

    def _next_doc(self) -> int:
        if self.cursor >= len(self._order):
            if not self.loop:
                return _IDLE
            self.epoch += 1
            self.cursor = 0
            self._order = self._make_order(self.epoch)
        d = int(self._order[self.cursor])
        self.cursor += 1
        return d

    def __iter__(self) -> "DocumentStream":
        return self

    def __next__(self) -> Batch:
        B, T = self.batch_size, self.segment_len
        for b in range(B):
            if self.slot_doc[b] == _NEEDS_DOC:
                self.slot_doc[b] = self._next_doc()
                self.slot_pos[b] = 0
        if (self.slot_doc == _IDLE).all():
            raise StopIteration
        tokens = np.zeros((B, T), dtype=np.int64)
        targets = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T), dtype=bool)
        tags = np.full((B, T), -1, dtype=np.int64)
        new_doc = np.zeros(B, dtype=bool)
        positions = np.zeros(B, dtype=np.int64)
        doc_index = self.slot_doc.copy()
        for b in range(B):
            d = int(self.slot_doc[b])
            if d < 0:
                continue
            p = int(self.slot_pos[b])
            arr = self.docs.tokens(d)
            n = min(T, len(arr) - 1 - p)
            seg = np.asarray(arr[p:p + n + 1])
            tokens[b, :n] = seg[:n]
            targets[b, :n] = seg[1:]
            mask[b, :n] = True
            if self._has_tags:
                tg = self.docs.tags(d)
                if tg is not None:
                    tags[b, :n] = tg[p:p + n]
            new_doc[b] = p == 0
            positions[b] = p
            self.slot_pos[b] = p + n
            if p + n >= len(arr) - 1:
                self.slot_doc[b] = _NEEDS_DOC
        self.batches += 1
        return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(mask),
                     torch.from_numpy(new_doc), torch.from_numpy(doc_index), torch.from_numpy(positions),
                     torch.from_numpy(tags))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches,
                "slot_doc": self.slot_doc.tolist(), "slot_pos": self.slot_pos.tolist(),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "loop": self.loop,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "segment_len": self.segment_len,
                "num_docs": len(self.docs)}

    def load_state_dict(self, state: dict) -> None:
        for k in ("batch_size", "segment_len", "num_docs", "rank", "world_size"):
            mine = len(self.docs) if k == "num_docs" else getattr(self, k)
            if state[k] != mine:
                raise ValueError(f"DocumentStream.load_state_dict: {k} differs (saved {state[k]}, now {mine}); "
                                 f"exact resume needs the same data and stream settings")
        self.seed, self.loop, self.shuffle = state["seed"], state["loop"], state["shuffle"]
        self.epoch, self.cursor, self.batches = int(state["epoch"]), int(state["cursor"]), int(state["batches"])
        self._order = self._make_order(self.epoch)
        self.slot_doc = np.asarray(state["slot_doc"], dtype=np.int64)
        self.slot_pos = np.asarray(state["slot_pos"], dtype=np.int64)
