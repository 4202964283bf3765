"""The kNN memory interface: a FIFO ring of (key, value) pairs per (document slot, head).

Every engine shares this ring (so FIFO order, reset and resume behave identically) and differs only
in how `search` finds the top-k entries. Shapes: B slots, H heads, T queries/entries per call,
N = capacity entries per (slot, head), D = head_dim, k = neighbours.

    mem.add(keys, values, positions)      # keys/values [B, H, T, D], positions [B, T] (token index in the document)
    res = mem.search(queries, k)          # queries [B, H, T, D] -> SearchResult, each field [B, H, T, k, ...]
    mem.reset(slots)                      # a new document starts in these slots
    len(mem), mem.nbytes, mem.state_dict(), mem.load_state_dict(d)

Entries of slot b always occupy ring indices [0, count[b]): before the ring wraps they are written in
order from 0, afterwards the ring is full. Search therefore only scores the filled prefix.

Bookkeeping lives on the ring's device (`count`, `ptr`), so `add`, `search` and a reset never read a device
tensor on the host (no synchronisation on CUDA). What the host needs (how much ring to allocate, how far to
score) comes from `_filled`, a host list of per-slot upper bounds kept in step with every add and reset:
exact when resets name their slots on the host (a list, or a CPU index or mask, as the trainer's
`batch.new_doc` is), an upper bound after a reset by a mask on the device (searches then score a few
invalid entries, masked on the device; results are the same).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class SearchResult:
    keys: torch.Tensor  # [B, H, T, k, D] retrieved keys (no gradient)
    values: torch.Tensor  # [B, H, T, k, D]
    scores: torch.Tensor  # [B, H, T, k] float32 inner products used for ranking (-inf where invalid)
    valid: torch.Tensor  # [B, H, T, k] bool: False where the slot holds fewer than k entries
    positions: torch.Tensor  # [B, H, T, k] token index of each retrieved entry in its document (-1 invalid)
    indices: torch.Tensor  # [B, H, T, k] ring index of each retrieved entry (0 where invalid)


class MemoryBackend:
    """FIFO ring storage shared by all engines; subclasses implement `_topk`."""

    name = "base"
    host_engine = False  # True: the engine searches on the host (faiss CPU indexes) and reads the ring there

    def __init__(self, batch_size: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                 score_dtype: torch.dtype = torch.float32):
        if dtype is None:  # the precision policy's memory dtype for this device (bf16 only where it is native)
            from memtrans.device import DTYPES, resolve_dtype_names
            dtype = DTYPES[resolve_dtype_names("fp32", "auto", "float32", device).memory_dtype]
        self.batch_size, self.heads, self.head_dim, self.capacity = batch_size, heads, head_dim, capacity
        self.dtype, self.device, self.score_dtype = dtype, torch.device(device), score_dtype
        self.count = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # filled entries per slot
        self.ptr = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # next ring index to write per slot
        self._filled = [0] * batch_size  # host: upper bound of count per slot (see the module docstring)
        self._filled_exact = True  # False after a reset by a device mask: _filled is then only a bound
        self._allocate(0)

    # ---- storage -------------------------------------------------------------------------------
    def _allocate(self, n: int) -> None:
        B, H, D = self.batch_size, self.heads, self.head_dim
        self.keys = torch.zeros(B, H, n, D, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(B, H, n, D, dtype=self.dtype, device=self.device)
        self.positions = torch.full((B, n), -1, dtype=torch.long, device=self.device)

    def _grow(self, needed: int) -> None:
        """Grow the ring geometrically up to capacity, so a partly filled memory costs only its part."""
        allocated = self.keys.shape[2]
        if needed <= allocated:
            return
        n = min(self.capacity, max(needed, 2 * allocated, 1024))
        old = (self.keys, self.values, self.positions)
        self._allocate(n)
        self.keys[:, :, :allocated] = old[0]
        self.values[:, :, :allocated] = old[1]
        self.positions[:, :allocated] = old[2]

    @property
    def exact_scores(self) -> bool:
        """True when `search` returns the fp32 inner products of the queries with the returned keys as
        stored, so a caller may use them as logits (memory attention then does not compute q.k twice)."""
        return self.score_dtype == torch.float32

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Append T entries per slot and head, overwriting the oldest ones once the ring is full."""
        B, H, T, D = keys.shape
        self._check(keys, "keys")
        if positions is None:
            positions = torch.full((B, T), -1, dtype=torch.long, device=self.device)
        if T > self.capacity:  # only the newest `capacity` entries can survive
            keys, values, positions = keys[:, :, -self.capacity:], values[:, :, -self.capacity:], positions[:, -self.capacity:]
            T = self.capacity
        # ptr[b] + T <= filled[b] + T before the ring is full, and the ring is fully allocated once it is
        self._grow(min(self.capacity, max(self._filled) + T))
        idx = (self.ptr[:, None] + torch.arange(T, device=self.device)[None, :]) % self.capacity  # [B, T]
        keys = keys.detach().to(self.device, self.dtype)
        values = values.detach().to(self.device, self.dtype)
        positions = positions.to(self.device)
        # every slot in one indexed write (no per-slot loop; T <= capacity, so no index repeats within a slot)
        bi = torch.arange(B, device=self.device)[:, None].expand(B, T)
        self.keys[bi, :, idx] = keys.transpose(1, 2)  # advanced indices first: [B, T, H, D]
        self.values[bi, :, idx] = values.transpose(1, 2)
        self.positions[bi, idx] = positions
        self._on_add(idx)
        self.ptr = (self.ptr + T) % self.capacity
        self.count = (self.count + T).clamp(max=self.capacity)
        self._filled = [min(self.capacity, n + T) for n in self._filled]

    def reset(self, slots) -> None:
        """Forget everything stored for these slots: indices (list, CPU tensor) or a bool mask [B] (CPU or on
        the ring's device; a device mask is applied on the device without being read)."""
        on_ring = isinstance(slots, torch.Tensor) and slots.device == self.device and not self.host_path
        host = None if on_ring else host_slots(slots, self.batch_size)  # on a device path a mask is never read
        if host is None and self.host_engine:
            host = _mask_to_host(slots, self.batch_size)  # host engines read it anyway (a sync on CUDA)
        if host is None:
            mask = device_mask(slots, self.batch_size, self.device)
            self.count.masked_fill_(mask, 0)
            self.ptr.masked_fill_(mask, 0)
            self.positions.masked_fill_(mask[:, None], -1)
            self._filled_exact = False
            return  # _filled stays an upper bound; device engines keep no host index to drop
        if not host:
            return
        for b in host:  # a fill per slot: nothing is copied from the host, nothing read back
            self.count[b:b + 1].zero_()
            self.ptr[b:b + 1].zero_()
            self.positions[b:b + 1].fill_(-1)
            self._filled[b] = 0
        self._on_reset(host)

    def __len__(self) -> int:
        """Stored (key, value) pairs per head, summed over slots."""
        return int(self.count.sum())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions)) + self._index_nbytes()

    # ---- search --------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        """Top-k stored entries by inner product with each query, per slot and head."""
        B, H, T, D = queries.shape
        self._check(queries, "queries")
        filled = min(max(self._filled), self.keys.shape[2])  # host bound: entries beyond a slot's count are masked
        kk = min(k, filled)
        gathered = []  # an engine may return the retrieved (key, value) rows itself
        if kk == 0:
            idx = torch.zeros(B, H, T, 0, dtype=torch.long, device=self.device)
            scores = torch.zeros(B, H, T, 0, device=self.device)
        else:
            # autocast would run a score matmul in bf16 (scores rounded before the top-k): engines pick their dtypes
            with _no_autocast(self.device):
                scores, idx, *gathered = self._topk(queries.detach(), kk, filled)
        valid = torch.isfinite(scores)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        if kk < k:  # pad to a fixed k with invalid entries
            pad = k - kk
            scores = torch.cat([scores, scores.new_full((B, H, T, pad), float("-inf"))], -1)
            idx = torch.cat([idx, idx.new_zeros(B, H, T, pad)], -1)
            valid = torch.cat([valid, valid.new_zeros(B, H, T, pad)], -1)
        if self.keys.shape[2] == 0:
            self._grow(1)
        n = self.keys.shape[2]
        if gathered and kk == k:
            keys, values = gathered
        else:
            # Row gathers (contiguous D-wide rows) instead of gather over an expanded index, which was ~8 ns per
            # element and cost more than the search itself at 8K entries; on a host path a prefetching copy
            # (gather_rows, which checks the row ids on the host), elsewhere index_select.
            from memtrans.memory.fast_topk import gather_rows
            gather = gather_rows if self.host_path else (lambda table, rows: table.index_select(0, rows))
            bh = torch.arange(B * H, device=self.device).view(B, H, 1) * n
            rows = (bh + idx.reshape(B, H, T * k)).reshape(-1)
            keys = gather(self.keys.reshape(B * H * n, D), rows).view(B, H, T, k, D)
            values = gather(self.values.reshape(B * H * n, D), rows).view(B, H, T, k, D)
        prow = (torch.arange(B, device=self.device).view(B, 1, 1) * n + idx.reshape(B, H, T * k)).reshape(-1)
        pos = self.positions.reshape(-1).index_select(0, prow).view(B, H, T, k)
        pos = torch.where(valid, pos, torch.full_like(pos, -1))
        return SearchResult(keys, values, scores.float(), valid, pos, idx)

    @property
    def host_path(self) -> bool:
        """True when `search` runs host code that may read tensors on the host (CPU kernels, faiss CPU): free
        on a CPU ring. False: only device operations (what CUDA runs), with no host read of any tensor."""
        return self.device.type == "cpu" or self.host_engine

    def _topk(self, queries: torch.Tensor, k: int, filled: int) -> tuple[torch.Tensor, ...]:
        """Return (scores [B,H,T,k], ring indices [B,H,T,k]); -inf scores mark missing results, whose index
        must then be 0. An engine that has the retrieved rows at hand may append them: (..., keys, values),
        each [B,H,T,k,D] in the ring dtype."""
        raise NotImplementedError

    def _valid_entries(self, n: int) -> torch.Tensor:
        """[B, n] bool: ring index j holds an entry of slot b."""
        return torch.arange(n, device=self.device)[None, :] < self.count[:, None]

    # ---- hooks for engines with an index of their own -----------------------------------------
    def _on_add(self, idx: torch.Tensor) -> None:
        pass

    def _on_reset(self, slots: list[int]) -> None:
        pass

    def _index_nbytes(self) -> int:
        return 0

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"engine": self.name, "capacity": self.capacity, "count": self.count.cpu().clone(), "ptr": self.ptr.cpu().clone(),
                "keys": self.keys.cpu().clone(), "values": self.values.cpu().clone(),
                "positions": self.positions.cpu().clone()}

    def load_state_dict(self, d: dict) -> None:
        if d["capacity"] != self.capacity or d["keys"].shape[:2] != self.keys.shape[:2] or d["keys"].shape[3] != self.head_dim:
            raise ValueError(f"memory state does not match this memory: capacity {d['capacity']} vs {self.capacity}, "
                             f"shape {tuple(d['keys'].shape)} vs [{self.batch_size}, {self.heads}, *, {self.head_dim}]")
        self.count, self.ptr = d["count"].to(self.device).clone(), d["ptr"].to(self.device).clone()
        self._filled, self._filled_exact = [int(n) for n in d["count"].tolist()], True
        self.keys = d["keys"].to(self.device, self.dtype)
        self.values = d["values"].to(self.device, self.dtype)
        self.positions = d["positions"].to(self.device)
        self._on_reset(list(range(self.batch_size)))  # engine indexes are rebuilt from the ring on demand

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 4 or x.shape[0] != self.batch_size or x.shape[1] != self.heads or x.shape[3] != self.head_dim:
            raise ValueError(f"{name} must have shape [batch_size={self.batch_size}, heads={self.heads}, T, "
                             f"head_dim={self.head_dim}], got {tuple(x.shape)}")


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def host_slots(slots, batch_size: int) -> list[int] | None:
    """Slots to reset as sorted Python ints when they are host data (a list/tuple/range of indices or bools, a
    numpy array, a CPU tensor of indices or a bool mask [B]); None for a tensor on another device, which a
    reset applies as a mask on the device without reading it."""
    if isinstance(slots, torch.Tensor):
        if slots.device.type != "cpu":
            if slots.dtype == torch.bool and slots.shape != (batch_size,):
                raise ValueError(f"a slot mask must have shape [{batch_size}], got {tuple(slots.shape)}")
            return None
        slots = slots.numpy()
    if not isinstance(slots, (list, tuple, range)):
        import numpy as np
        arr = np.asarray(slots)
        if arr.dtype == bool:
            if arr.shape != (batch_size,):
                raise ValueError(f"a slot mask must have shape [{batch_size}], got {tuple(arr.shape)}")
            return [int(i) for i in np.flatnonzero(arr)]
        slots = arr.reshape(-1).tolist()
    slots = list(slots)
    if slots and len(slots) == batch_size and all(isinstance(s, bool) or type(s).__name__ == "bool_" for s in slots):
        return [i for i, s in enumerate(slots) if s]
    out = sorted({int(s) for s in slots})
    if out and (out[0] < 0 or out[-1] >= batch_size):
        raise ValueError(f"slots must lie in 0..{batch_size - 1}, got {out}")
    return out


def device_mask(slots: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """A device tensor of slots (bool mask [B] or indices) as a bool mask [B] on `device`, without a host read."""
    slots = slots.to(device)
    if slots.dtype == torch.bool:
        return slots
    return torch.zeros(batch_size, dtype=torch.bool, device=device).index_fill_(0, slots.reshape(-1).long(), True)


def _mask_to_host(slots: torch.Tensor, batch_size: int) -> list[int]:
    """A device tensor of slots read on the host (a synchronisation; for host engines only)."""
    if slots.dtype == torch.bool:
        return slots.nonzero().flatten().cpu().tolist()
    return host_slots(slots.cpu(), batch_size)
