"""faiss engines over the shared FIFO ring. The only module that imports faiss.

- `faiss_flat`: exact inner-product search with faiss' brute-force kernel (`faiss.knn`), per (slot, head).
- `faiss_ivf`: approximate search with one `IndexIVFFlat` per (slot, head). The index is trained by k-means on
  the slot's own keys once `min(capacity, 39 * nlist)` entries are stored (until then search is exact over
  the ring); FIFO is kept with `remove_ids` of overwritten ring entries before `add_with_ids`. A reset
  drops the slot's indexes, so each document trains its own (keys drift between documents and during
  training). After `load_state_dict` indexes are rebuilt from the ring, so resumed IVF results can differ
  from an uninterrupted run; the exact engines resume exactly.

Both are host engines (faiss' CPU indexes). For a model on a GPU their ring stays in host memory, so a search
copies only the queries to the host and the retrieved rows back (B*H*T*k*D each), never the ring (before:
the whole ring of every (slot, head), ~8.6 GB per memory layer per step at the paper's scale); each search
and each reset by a device mask still synchronises. On GPUs use `memory_backend: exact` (a device engine).
faiss' GPU indexes (`faiss.StandardGpuResources`, in faiss-gpu builds) are not used yet: this project's
faiss is the CPU build, so there was nothing to test them with.
"""
from __future__ import annotations

import numpy as np
import torch

from memtrans.memory.base import MemoryBackend, SearchResult

try:
    import faiss
except ImportError as e:  # pragma: no cover - faiss-cpu is a core dependency
    raise ImportError("faiss engines need faiss: pip install faiss-cpu") from e


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


def _pack(scores: list, ids: list, shape: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.from_numpy(np.stack(scores)).view(*shape).to(device)
    i = torch.from_numpy(np.stack(ids)).view(*shape).to(device)
    s = torch.where(i < 0, torch.full_like(s, float("-inf")), s)
    return s, i.clamp(min=0)


class FaissFlatMemory(MemoryBackend):
    name = "faiss_flat"
    exact_scores = True  # faiss scores fp32 copies of the stored keys whatever score_dtype says (IVF too)
    host_engine = True

    def __init__(self, *args, device: torch.device | str = "cpu", **kwargs):
        self.model_device = torch.device(device)  # where search results go; the ring stays on the host
        super().__init__(*args, device="cpu", **kwargs)

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        res = super().search(queries.to(self.device), k)
        if queries.device != self.device:
            res = SearchResult(*(t.to(queries.device) for t in (res.keys, res.values, res.scores, res.valid,
                                                                   res.positions, res.indices)))
        return res

    def _topk(self, queries, k, filled):
        B, H, T, _ = queries.shape
        scores, ids = [], []
        for b in range(B):
            n = int(self.count[b])
            for h in range(H):
                if n == 0:
                    scores.append(np.full((T, k), -np.inf, np.float32))
                    ids.append(np.full((T, k), -1, np.int64))
                    continue
                s, i = faiss.knn(_np(queries[b, h]), _np(self.keys[b, h, :n]), min(k, n),
                                 metric=faiss.METRIC_INNER_PRODUCT)
                if i.shape[1] < k:
                    s = np.pad(s, ((0, 0), (0, k - i.shape[1])), constant_values=-np.inf)
                    i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
                scores.append(s)
                ids.append(i)
        return _pack(scores, ids, (B, H, T, k), self.device)


class FaissIVFMemory(FaissFlatMemory):
    name = "faiss_ivf"

    def __init__(self, *args, nlist: int = 64, nprobe: int = 8, **kwargs):
        self.nlist, self.nprobe = nlist, nprobe
        super().__init__(*args, **kwargs)
        self.indexes: list[list] = [[None] * self.heads for _ in range(self.batch_size)]

    @property
    def min_train(self) -> int:
        return max(self.nlist, min(self.capacity, 39 * self.nlist))

    def _build(self, b: int) -> None:
        n = int(self.count[b])
        for h in range(self.heads):
            quantizer = faiss.IndexFlatIP(self.head_dim)
            index = faiss.IndexIVFFlat(quantizer, self.head_dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            x = _np(self.keys[b, h, :n])
            index.train(x)
            index.add_with_ids(x, np.arange(n, dtype=np.int64))
            index.nprobe = self.nprobe
            self.indexes[b][h] = index

    def _on_add(self, idx):
        for b in range(self.batch_size):
            if self.indexes[b][0] is None:
                continue
            ids = idx[b].cpu().numpy().astype(np.int64)
            overwritten = ids[ids < int(self.count[b])]
            for h in range(self.heads):
                index = self.indexes[b][h]
                if len(overwritten):
                    index.remove_ids(overwritten)
                index.add_with_ids(_np(self.keys[b, h, idx[b]]), ids)

    def _on_reset(self, slots):
        for b in slots:
            self.indexes[b] = [None] * self.heads

    def _topk(self, queries, k, filled):
        B, H, T, _ = queries.shape
        for b in range(B):
            if self.indexes[b][0] is None and int(self.count[b]) >= self.min_train:
                self._build(b)
        if any(self.indexes[b][0] is None and int(self.count[b]) > 0 for b in range(B)):
            exact_s, exact_i = super()._topk(queries, k, filled)  # slots not yet trained: exact search
        scores, ids = [], []
        for b in range(B):
            for h in range(H):
                index = self.indexes[b][h]
                if index is None:
                    if int(self.count[b]) == 0:
                        scores.append(np.full((T, k), -np.inf, np.float32))
                        ids.append(np.full((T, k), -1, np.int64))
                    else:
                        s, i = exact_s[b, h].cpu().numpy(), exact_i[b, h].cpu().numpy()
                        scores.append(s)
                        ids.append(np.where(np.isfinite(s), i, -1))
                    continue
                s, i = index.search(_np(queries[b, h]), k)
                scores.append(s)
                ids.append(i)
        return _pack(scores, ids, (B, H, T, k), self.device)

    def _index_nbytes(self) -> int:
        # IVF-Flat keeps its own fp32 copy of the keys plus an 8-byte id per entry
        return sum(int(self.count[b]) * self.heads * (4 * self.head_dim + 8)
                   for b in range(self.batch_size) if self.indexes[b][0] is not None)
