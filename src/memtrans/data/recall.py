"""Synthetic long-range recall: bind random keys to random values early, query them much later.

Format of one document (ASCII only, so with the byte tokenizer token i is character i):

    <filler> key QXZP = 7391 . <filler> key BDRA = 0457 . <filler> ... <long filler>
    ... BDRA ? 0457 . <filler> QXZP ? 7391 . <filler>

- filler: random lowercase "words" (letters a-z, 1-9 letters, separated by single spaces) from a seeded
  RNG: it cannot predict anything about keys or values;
- keys: `recall_key_len` random uppercase letters, distinct within a document;
- values: `recall_value_len` random digits (alphabet of 10: a model that cannot see the binding is at
  chance 0.1 on every value character);
- `recall_pairs` bindings `key K = V .` lie in the first part of the document; every key is queried
  exactly once, in a random order, as `K ? V .` in the last part, and every query value character lies
  at least `recall_min_distance` tokens after its binding's value character (chosen far beyond the
  Transformer-XL window of two segments, so only a long-range memory can answer).
  Gaps are random, so distances spread from `recall_min_distance` to about `recall_doc_len`.

Scoring (`tags`): `tags[p] = d > 0` at a position p whose TARGET (token p+1) is a value character of a
query, where `d` is the distance in tokens from that target back to the same character of the
binding (`tokens[p + 1] == tokens[p + 1 - d]`); -1 everywhere else. Only these positions count for the
recall accuracy; the language-model loss still covers the whole document.

Documents are deterministic functions of (DataConfig.recall_seed, document index) and the DataConfig recall_* fields.
"""
from __future__ import annotations

import numpy as np

from memtrans.config import DataConfig
from memtrans.data.corpus import Document

VALUE_ALPHABET = "0123456789"
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def recall_info(cfg: DataConfig, seed: int | None = None) -> dict:
    """Description of the task: chance level of a value character, layout parameters."""
    return {"chance": 1.0 / len(VALUE_ALPHABET), "value_alphabet": VALUE_ALPHABET, "pairs": cfg.recall_pairs,
            "key_len": cfg.recall_key_len, "value_len": cfg.recall_value_len, "doc_len": cfg.recall_doc_len,
            "min_distance": cfg.recall_min_distance, "docs": cfg.recall_docs,
            "seed": _recall_seed(cfg, seed)}


def _recall_seed(cfg: DataConfig, seed: int | None) -> int:
    """An explicit `seed` argument wins; else DataConfig.recall_seed (fixed, so the benchmark does not
    change with the training seed)."""
    return int(seed if seed is not None else getattr(cfg, "recall_seed", 0))


def _check(cfg: DataConfig) -> tuple[int, int]:
    for name in ("recall_docs", "recall_doc_len", "recall_pairs", "recall_key_len", "recall_value_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"data.{name} must be positive, got {getattr(cfg, name)}")
    if cfg.recall_min_distance < 0:
        raise ValueError(f"data.recall_min_distance must be >= 0, got {cfg.recall_min_distance}")
    if len(KEY_ALPHABET) ** cfg.recall_key_len < cfg.recall_pairs:
        raise ValueError(f"data.recall_key_len={cfg.recall_key_len} allows fewer distinct keys than "
                         f"recall_pairs={cfg.recall_pairs}")
    lb = len("key ") + cfg.recall_key_len + len(" = ") + cfg.recall_value_len + len(" . ")
    lq = cfg.recall_key_len + len(" ? ") + cfg.recall_value_len + len(" . ")
    need = cfg.recall_pairs * (lb + lq + 2) + cfg.recall_min_distance + 2
    if cfg.recall_doc_len < need:
        raise ValueError(f"data.recall_doc_len={cfg.recall_doc_len} is too short for recall_pairs={cfg.recall_pairs} "
                         f"and recall_min_distance={cfg.recall_min_distance}: it needs at least {need}")
    return lb, lq


def _filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """n bytes of random lowercase words; starts and ends with a space (when n >= 1)."""
    out = rng.integers(ord("a"), ord("z") + 1, size=n, dtype=np.uint8)
    out[rng.random(n) < 0.18] = ord(" ")
    if n:
        out[0] = out[-1] = ord(" ")
    return out


def generate_recall_document(cfg: DataConfig, index: int, seed: int | None = None) -> tuple[str, np.ndarray]:
    """Document `index`: (text, tags) with tags int32 [len(text)] as described in the module docstring."""
    lb, lq = _check(cfg)
    rng = np.random.default_rng([_recall_seed(cfg, seed), 7919, index])
    P, K, V, N = cfg.recall_pairs, cfg.recall_key_len, cfg.recall_value_len, cfg.recall_doc_len
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < P:
        k = "".join(KEY_ALPHABET[i] for i in rng.integers(0, 26, size=K))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = ["".join(VALUE_ALPHABET[i] for i in rng.integers(0, 10, size=V)) for _ in range(P)]
    order = rng.permutation(P)
    # Gaps: P before bindings, 1 middle (>= min distance), P before queries, 1 tail; each >= 1.
    slack = N - P * (lb + lq) - cfg.recall_min_distance - (2 * P + 2)
    cuts = np.sort(rng.integers(0, slack + 1, size=2 * P + 1))
    shares = np.diff(np.concatenate([[0], cuts, [slack]]))
    gaps = shares + 1
    gaps[P] += cfg.recall_min_distance
    buf = np.empty(N, dtype=np.uint8)
    tags = np.full(N, -1, dtype=np.int32)
    pos = 0
    bind_val_pos = [0] * P

    def put(b: bytes) -> None:
        nonlocal pos
        buf[pos:pos + len(b)] = np.frombuffer(b, dtype=np.uint8)
        pos += len(b)

    def gap(n: int) -> None:
        nonlocal pos
        buf[pos:pos + n] = _filler(rng, n)
        pos += n

    for j in range(P):
        gap(int(gaps[j]))
        put(f"key {keys[j]} = ".encode())
        bind_val_pos[j] = pos
        put(f"{values[j]} . ".encode())
    gap(int(gaps[P]))
    for qi, j in enumerate(order):
        gap(int(gaps[P + 1 + qi]))
        put(f"{keys[j]} ? ".encode())
        q = pos
        put(f"{values[j]} . ".encode())
        for c in range(V):
            tags[q + c - 1] = (q + c) - (bind_val_pos[j] + c)
    gap(N - pos)
    assert pos == N
    return buf.tobytes().decode("ascii"), tags


def generate_recall_corpus(cfg: DataConfig, seed: int | None = None) -> list[Document]:
    """`cfg.recall_docs` documents with ids `recall-00000`, ...; tags in `meta["tags"]` (np.int32)."""
    docs = []
    for i in range(cfg.recall_docs):
        text, tags = generate_recall_document(cfg, i, seed)
        docs.append(Document(f"recall-{i:05d}", text, {"tags": tags}))
    return docs
