"""prepare_data: corpus -> split -> tokenizer -> tokenised splits, cached on disk as numpy memmaps.

Cache layout (`<cache_dir>/tokens/<key>/`, key = content hash of every document's id and text, the split,
the tokenizer's vocabulary and the piece/skip settings):

    meta.json              ids per split and the info dict
    {split}.tokens.npy     all tokens of the split, concatenated (uint8 / uint16 / uint32)
    {split}.offsets.npy    int64 [n_docs + 1]: document i is tokens[offsets[i]:offsets[i + 1]]
    {split}.bytes.npy      int64 [n_docs]: UTF-8 bytes each document stands for
    {split}.tags.npy       int32, like tokens (recall only)

The directory is written under a temporary name and renamed into place (atomic); a second run with
the same data memory-maps it and starts at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memtrans.config import DataConfig
from memtrans.data.corpus import SPLITS, Document, default_cache_dir, load_corpus, split_documents
from memtrans.data.tokenizer import Tokenizer, get_tokenizer

CACHE_VERSION = 1


class TokenizedDocs:
    """The tokenised documents of one split: `tokens(i)`, `tags(i)` (None unless the corpus has tags), `ids`."""

    def __init__(self, ids: Sequence[str], tokens: np.ndarray, offsets: np.ndarray,
                 tags: np.ndarray | None = None, doc_bytes: np.ndarray | None = None) -> None:
        self.ids = list(ids)
        self._tokens = tokens
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._tags = tags
        if len(self._offsets) != len(self.ids) + 1:
            raise ValueError("TokenizedDocs: offsets must have len(ids) + 1 entries")
        self.lengths = np.diff(self._offsets)
        self.doc_bytes = np.asarray(doc_bytes, dtype=np.int64) if doc_bytes is not None else self.lengths.copy()

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], ids: Sequence[str] | None = None,
                    tags: Sequence[np.ndarray] | None = None, token_bytes: np.ndarray | None = None) -> "TokenizedDocs":
        """Build in memory from a list of per-document token arrays (handy in tests)."""
        arrays = [np.asarray(a).reshape(-1) for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        flat_tags = None
        if tags is not None:
            flat_tags = np.concatenate([np.asarray(t, dtype=np.int32) for t in tags]) if tags else np.zeros(0, np.int32)
        nbytes = None if token_bytes is None else [int(token_bytes[a].sum()) for a in arrays]
        return cls(ids if ids is not None else [str(i) for i in range(len(arrays))], flat, offsets, flat_tags, nbytes)

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self, i: int) -> np.ndarray:
        return self._tokens[self._offsets[i]:self._offsets[i + 1]]

    def tags(self, i: int) -> np.ndarray | None:
        if self._tags is None:
            return None
        return self._tags[self._offsets[i]:self._offsets[i + 1]]

    @property
    def has_tags(self) -> bool:
        return self._tags is not None

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def save(self, directory: Path, split: str) -> None:
        np.save(directory / f"{split}.tokens.npy", np.ascontiguousarray(self._tokens))
        np.save(directory / f"{split}.offsets.npy", self._offsets)
        np.save(directory / f"{split}.bytes.npy", self.doc_bytes)
        if self._tags is not None:
            np.save(directory / f"{split}.tags.npy", np.ascontiguousarray(self._tags))

    @classmethod
    def load(cls, directory: Path, split: str, ids: Sequence[str]) -> "TokenizedDocs":
        tags_path = directory / f"{split}.tags.npy"
        return cls(ids, np.load(directory / f"{split}.tokens.npy", mmap_mode="r"),
                   np.load(directory / f"{split}.offsets.npy"),
                   np.load(tags_path, mmap_mode="r") if tags_path.exists() else None,
                   np.load(directory / f"{split}.bytes.npy"))

    def __repr__(self) -> str:
        return f"TokenizedDocs({len(self)} docs, {self.num_tokens} tokens)"


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    splits: dict[str, TokenizedDocs]
    info: dict

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def token_bytes(self) -> np.ndarray:
        return self.tokenizer.token_bytes


def _doc_digest(d: Document) -> str:
    h = hashlib.sha256(d.id.encode("utf-8", errors="surrogatepass") + b"\0")
    h.update(d.text.encode("utf-8", errors="surrogatepass"))
    tags = d.meta.get("tags")
    if tags is not None:
        h.update(np.asarray(tags, dtype=np.int32).tobytes())
    return h.hexdigest()


def _tokenize_split(docs: list[Document], tok: Tokenizer, cfg: DataConfig) -> tuple[TokenizedDocs, dict]:
    ids, arrays, tag_arrays, nbytes = [], [], [], []
    has_tags = any(d.meta.get("tags") is not None for d in docs)
    skipped = split_docs = decode_errors = 0
    texts = [d.text for d in docs]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    for d, arr in zip(docs, encoded):
        decode_errors += bool(d.meta.get("decode_errors"))
        if len(arr) < max(cfg.min_doc_tokens, 1):
            skipped += 1
            continue
        arr = arr.astype(tok.dtype, copy=False)
        tags = None
        if has_tags:
            tags = np.asarray(d.meta["tags"], dtype=np.int32) if d.meta.get("tags") is not None \
                else np.full(len(arr), -1, np.int32)
            if len(tags) != len(arr):
                raise ValueError(f"document {d.id}: {len(tags)} tags for {len(arr)} tokens (recall needs data.tokenizer=byte)")
        m = cfg.max_doc_tokens
        if m is not None and m > 0 and len(arr) > m:
            split_docs += 1
            for k, start in enumerate(range(0, len(arr), m)):
                ids.append(f"{d.id}#{k}")
                arrays.append(arr[start:start + m])
                if tags is not None:
                    t = tags[start:start + m].copy()
                    # A query whose binding lies in an earlier piece cannot be answered from this piece.
                    pos = np.arange(len(t))
                    t[(t >= 0) & (pos + 1 - t < 0)] = -1
                    # The last token of a piece has its target in the next piece: not predicted here.
                    t[-1] = -1
                    tag_arrays.append(t)
        else:
            ids.append(d.id)
            arrays.append(arr)
            if tags is not None:
                tag_arrays.append(tags)
    td = TokenizedDocs.from_arrays(arrays, ids, tag_arrays if has_tags else None, tok.token_bytes)
    if td._tokens.dtype != tok.dtype:
        td._tokens = td._tokens.astype(tok.dtype)
    return td, {"skipped_short": skipped, "split_long": split_docs, "decode_errors": decode_errors}


def prepare_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load, split, tokenise (or read the cache) and describe the data. `info` holds per-split doc, token
    and byte counts, skipped documents, tokenizer and corpus names, vocab_size, and for recall the chance level.

    `seed` is accepted for interface stability; the splits are seed-free (by document id hash) and the
    recall documents depend on `cfg.recall_seed`, so runs with different training seeds share the data.
    """
    from memtrans.data.recall import recall_info

    if cfg.corpus == "recall" and cfg.tokenizer != "byte":
        raise ValueError(f"data.corpus=recall needs data.tokenizer=byte (got {cfg.tokenizer!r}): its tags count "
                         f"positions in bytes")
    if cfg.max_doc_tokens is not None and cfg.max_doc_tokens < 2:
        raise ValueError(f"data.max_doc_tokens must be >= 2 or null, got {cfg.max_doc_tokens}")
    cache = default_cache_dir(cfg)
    docs = load_corpus(cfg)
    parts = split_documents(docs, cfg.val_fraction, cfg.test_fraction)
    tok, tok_info = get_tokenizer(cfg.tokenizer, [d.text for d in parts["train"]], cfg.bpe_vocab_size, cache)

    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "tok": tok.fingerprint, "max": cfg.max_doc_tokens,
                                   "min": cfg.min_doc_tokens}).encode())
    for s in SPLITS:
        h.update(f"|{s}|".encode())
        for d in parts[s]:
            h.update(_doc_digest(d).encode())
    key = h.hexdigest()[:20]
    root = cache / "tokens" / key
    info: dict
    if (root / "meta.json").is_file():
        meta = json.loads((root / "meta.json").read_text())
        splits = {s: TokenizedDocs.load(root, s, meta["ids"][s]) for s in SPLITS}
        info = dict(meta["info"])
        info["cache_hit"] = True
    else:
        splits, stats = {}, {"skipped_short": 0, "split_long": 0, "decode_errors": 0}
        for s in SPLITS:
            splits[s], st = _tokenize_split(parts[s], tok, cfg)
            for k in stats:
                stats[k] += st[k]
        info = {
            "corpus": cfg.corpus,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "source_docs": {s: len(parts[s]) for s in SPLITS},
            "docs": {s: len(splits[s]) for s in SPLITS},
            "tokens": {s: splits[s].num_tokens for s in SPLITS},
            "bytes": {s: splits[s].num_bytes for s in SPLITS},
            "skipped_docs": stats["skipped_short"],
            "split_docs": stats["split_long"],
            "decode_errors": stats["decode_errors"],
            "min_doc_tokens": cfg.min_doc_tokens,
            "max_doc_tokens": cfg.max_doc_tokens,
        }
        if cfg.corpus == "recall":
            info["recall"] = recall_info(cfg)
            info["chance"] = info["recall"]["chance"]
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{key}.", suffix=".tmp"))
        try:
            for s in SPLITS:
                splits[s].save(tmp, s)
            meta = {"ids": {s: splits[s].ids for s in SPLITS}, "info": info}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.replace(tmp, root)
            except OSError:  # another process wrote the same key first: use theirs
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        splits = {s: TokenizedDocs.load(root, s, splits[s].ids) for s in SPLITS}
        info["cache_hit"] = False
    info.update(tok_info)
    info["cache_path"] = str(root)
    return DataBundle(tok, splits, info)
