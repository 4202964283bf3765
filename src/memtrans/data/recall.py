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
  at least `recall_min_distance` tokens after its binding's value character (chosen beyond the model's local
  reach, `memtrans.model.reach`: segment_len x (depth + 1) - 1 tokens with the XL cache, so only a long-range
  memory can answer; `check_beyond_local_reach` rejects a config where a query could lie within it).
  Gaps are random, so distances spread from `recall_min_distance` to about `recall_doc_len`.

Layout `fused` (`DataConfig.recall_layout`): each binding is ONE token, the byte that identifies the
(key, value) pair; the bindings stand in a row, and later the queries, each the key letter followed by its
value digit:

    <filler> ÊïÄÛßó <filler of at least recall_min_distance> A4D1E7C7F1B0 <filler>

The binding character is chr(0xC0 + 10 * key + value), two UTF-8 bytes 0xC3 and 0x80 + 10 * key + value;
the second byte is the binding token. Keys are the letters A-F (so `recall_pairs <= 6`, key and value
length 1). Looking a value up then needs one attention layer (query "key letter" -> binding token ->
its value), not the two-layer circuit of the text layout, where the key must first be copied next to
the value; tiny models on a CPU budget learn the former in seconds and the latter not at all (measured:
see benchmarks/recall_proof.py). Scattered through the filler instead of in a row, one-token bindings were
learned far more slowly. Lengths (`recall_doc_len`, distances) count bytes = tokens.

Scoring (`tags`): `tags[p] = d > 0` at a position p whose TARGET (token p+1) is a value character of a
query, where `d` is the distance in tokens from that target back to its binding: to the same character
of the bound value (`tokens[p + 1] == tokens[p + 1 - d]`) in the text layout, to the binding token in
the fused layout; -1 everywhere else. Only these positions count for the
recall accuracy; the language-model loss still covers the whole document.

Documents are deterministic functions of (DataConfig.recall_seed, document index) and the DataConfig recall_* fields.
"""
from __future__ import annotations

import numpy as np

from memtrans.config import RECALL_LAYOUTS, DataConfig
from memtrans.data.corpus import Document

VALUE_ALPHABET = "0123456789"
KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LAYOUTS = RECALL_LAYOUTS
FUSED_KEYS = "ABCDEF"  # 6 keys x 10 values = 60 binding characters U+00C0..U+00FB


def fused_binding_token(key: int, value: int) -> int:
    """The byte token that carries a fused binding (the 2nd UTF-8 byte of chr(0xC0 + 10 * key + value))."""
    return 0x80 + 10 * key + value


def recall_info(cfg: DataConfig, seed: int | None = None) -> dict:
    """Description of the task: chance level of a value character, layout parameters."""
    return {"chance": 1.0 / len(VALUE_ALPHABET), "value_alphabet": VALUE_ALPHABET, "layout": cfg.recall_layout,
            "pairs": cfg.recall_pairs,
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
    if cfg.recall_layout not in LAYOUTS:
        raise ValueError(f"data.recall_layout: {cfg.recall_layout!r} is not allowed; choose one of {', '.join(LAYOUTS)}")
    if cfg.recall_layout == "fused":
        if cfg.recall_key_len != 1 or cfg.recall_value_len != 1 or cfg.recall_pairs > len(FUSED_KEYS):
            raise ValueError(f"data.recall_layout=fused needs recall_key_len=1, recall_value_len=1 and "
                             f"recall_pairs <= {len(FUSED_KEYS)} (got {cfg.recall_key_len}, {cfg.recall_value_len}, "
                             f"{cfg.recall_pairs}); set them or use recall_layout=text")
        lb, lq = 2, 2  # bytes of the binding character, of "K" + "v"; no gaps between pairs
    else:
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


def min_query_distance(cfg: DataConfig) -> int:
    """The smallest distance (tags value) any query of this layout can have: fused, the last binding queried first
    right after the middle filler (>= recall_min_distance): + 2; text, the last binding's value, " . ", the middle
    and one query filler, the key and " ? ": + key_len + value_len + 8."""
    if cfg.recall_layout == "fused":
        return cfg.recall_min_distance + 2
    return cfg.recall_min_distance + cfg.recall_key_len + cfg.recall_value_len + 8


def check_beyond_local_reach(cfg) -> None:
    """A recall config (memtrans.config.Config) whose queries could lie within the model's local reach (the
    segment, the XL cache and the depth, without memory) measures local attention, not the memory: ValueError
    naming the fields. Not for the fine-tuning recipe's pretrain, which puts bindings in reach on purpose."""
    from memtrans.model.reach import describe, far_distance

    d, m = cfg.data, cfg.model
    if d.corpus != "recall":
        return
    closest = min_query_distance(d)
    far = far_distance(m.segment_len, m.depth, m.xl_cache)
    if closest < far:
        need = d.recall_min_distance + far - closest
        raise ValueError(
            f"data.recall_min_distance={d.recall_min_distance} lets a query lie {closest} tokens after its binding "
            f"(data.recall_layout={d.recall_layout}), within the model's local reach of {describe(m)}: such queries "
            f"are answered without memory. Set data.recall_min_distance >= {need} (and data.recall_doc_len to fit), "
            f"or a smaller model.segment_len or model.depth")


def _filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """n bytes of random lowercase words; starts and ends with a space (when n >= 1)."""
    out = rng.integers(ord("a"), ord("z") + 1, size=n, dtype=np.uint8)
    out[rng.random(n) < 0.18] = ord(" ")
    if n:
        out[0] = out[-1] = ord(" ")
    return out


def generate_recall_document(cfg: DataConfig, index: int, seed: int | None = None) -> tuple[str, np.ndarray]:
    """Document `index`: (text, tags) with tags int32, one per UTF-8 byte (= token) of text, as described in
    the module docstring (in the text layout bytes and characters coincide)."""
    lb, lq = _check(cfg)
    rng = np.random.default_rng([_recall_seed(cfg, seed), 7919, index])
    P, K, V, N = cfg.recall_pairs, cfg.recall_key_len, cfg.recall_value_len, cfg.recall_doc_len
    if cfg.recall_layout == "fused":
        return _fused_document(cfg, rng)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < P:
        k = "".join(KEY_ALPHABET[i] for i in rng.integers(0, 26, size=K))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = ["".join(VALUE_ALPHABET[i] for i in rng.integers(0, 10, size=V)) for _ in range(P)]
    order = rng.permutation(P)
    gaps = _gaps(cfg, rng, lb, lq)
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


def _gaps(cfg: DataConfig, rng: np.random.Generator, lb: int, lq: int) -> np.ndarray:
    """Filler lengths: P before bindings, 1 middle (>= min distance), P before queries, 1 tail; each >= 1."""
    P, N = cfg.recall_pairs, cfg.recall_doc_len
    slack = N - P * (lb + lq) - cfg.recall_min_distance - (2 * P + 2)
    cuts = np.sort(rng.integers(0, slack + 1, size=2 * P + 1))
    gaps = np.diff(np.concatenate([[0], cuts, [slack]])) + 1
    gaps[P] += cfg.recall_min_distance
    return gaps


def _fused_document(cfg: DataConfig, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """Filler, the P binding tokens in a row, filler (>= min distance), the P queries in a row, filler."""
    P, N = cfg.recall_pairs, cfg.recall_doc_len
    keys = rng.permutation(len(FUSED_KEYS))[:P]
    values = rng.integers(0, len(VALUE_ALPHABET), size=P)
    order = rng.permutation(P)
    g0, g1, _ = np.diff(np.concatenate([[0], np.sort(rng.integers(0, N - 4 * P - cfg.recall_min_distance + 1, size=2)),
                                        [N - 4 * P - cfg.recall_min_distance]]))
    g1 += cfg.recall_min_distance
    bindings = np.stack([np.full(P, 0xC3), [fused_binding_token(int(k), int(v)) for k, v in zip(keys, values)]], 1)
    queries = np.stack([[ord(FUSED_KEYS[k]) for k in keys[order]], [ord(VALUE_ALPHABET[v]) for v in values[order]]], 1)
    buf = np.concatenate([_filler(rng, g0), bindings.reshape(-1), _filler(rng, g1), queries.reshape(-1)])
    buf = np.concatenate([buf, _filler(rng, N - len(buf))]).astype(np.uint8)
    tags = np.full(N, -1, dtype=np.int32)
    q0, b0 = g0 + 2 * P + g1, g0
    for i, j in enumerate(order):  # at the key letter of query i; its target (the value digit) is bound at b0 + 2j + 1
        tags[q0 + 2 * i] = (q0 + 2 * i + 1) - (b0 + 2 * j + 1)
    return buf.tobytes().decode("utf-8"), tags


def generate_recall_corpus(cfg: DataConfig, seed: int | None = None) -> list[Document]:
    """`cfg.recall_docs` documents with ids `recall-00000`, ...; tags in `meta["tags"]` (np.int32)."""
    docs = []
    for i in range(cfg.recall_docs):
        text, tags = generate_recall_document(cfg, i, seed)
        docs.append(Document(f"recall-{i:05d}", text, {"tags": tags}))
    return docs
