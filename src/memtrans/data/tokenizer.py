"""Tokenisers: byte-level (vocab 256, lossless, the default) and a locally trained byte-level BPE.

Both expose `encode(text) -> np.ndarray` (integer ids), `decode(ids) -> str` (invalid UTF-8 becomes
U+FFFD), `vocab_size`, `token_bytes` (int64 array [vocab_size]: how many UTF-8 bytes each id stands for,
so that bits per byte = sum(loss in nats) / ln 2 / sum(token_bytes[targets])), `name` and `dtype`
(the smallest unsigned dtype that holds every id, used for the on-disk cache).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from memtrans.utils import atomic_write_text


class Tokenizer:
    name: str = "base"
    vocab_size: int = 0
    token_bytes: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 else np.uint32)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer (and its vocabulary) for cache keys."""
        return self.name


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocab 256, every token is one byte."""

    name = "byte"
    vocab_size = 256

    def __init__(self) -> None:
        self.token_bytes = np.ones(256, dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        arr = np.asarray(_to_numpy(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("byte tokenizer: ids must lie in 0..255")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _to_numpy(ids):
    if hasattr(ids, "detach"):
        return ids.detach().cpu().numpy()
    return ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by ByteLevel BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPETokenizer(Tokenizer):
    """Hugging Face `tokenizers` ByteLevel BPE (no normaliser, no prefix space: lossless on any text)."""

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.name = f"bpe{self.vocab_size}"
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        tb = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, idx in hf_tokenizer.get_vocab().items():
            tb[idx] = sum(1 for ch in piece if ch in inv) if all(ch in inv for ch in piece) else len(piece.encode())
        self.token_bytes = tb
        self._json = hf_tokenizer.to_str()

    @property
    def fingerprint(self) -> str:
        return f"{self.name}-{hashlib.sha256(self._json.encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        arr = np.asarray(_to_numpy(ids), dtype=np.int64).reshape(-1)
        # Decode through raw bytes so that ids splitting a UTF-8 character still decode (with U+FFFD).
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        pieces = [self._tok.id_to_token(int(i)) or "" for i in arr]
        data = bytes(inv[ch] for piece in pieces for ch in piece if ch in inv)
        return data.decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self._json)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:  # pragma: no cover
            raise ValueError("data.tokenizer=bpe needs the `tokenizers` package: pip install tokenizers") from None
        if vocab_size < 257:
            raise ValueError(f"data.bpe_vocab_size must exceed 256 (the byte alphabet), got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False, min_frequency=2)
        tok.train_from_iterator(_chunks(texts), trainer=trainer)
        return cls(tok)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterable[str]:
    for t in texts:
        for i in range(0, len(t), size):
            yield t[i:i + size]


def get_tokenizer(kind: str, train_texts: list[str] | None = None, vocab_size: int = 8192,
                  cache_dir: str | Path | None = None) -> tuple[Tokenizer, dict]:
    """Build the tokenizer named `kind` ("byte" or "bpe"); BPE trains on `train_texts` and is cached on disk
    under `cache_dir/tokenizers/` keyed by (hash of the training text, vocab size). Returns (tokenizer, info)."""
    if kind == "byte":
        return ByteTokenizer(), {"tokenizer": "byte"}
    if kind != "bpe":
        from memtrans.config import TOKENIZERS
        raise ValueError(f"data.tokenizer: {kind!r} is not allowed; choose one of {', '.join(TOKENIZERS)}")
    if not train_texts:
        raise ValueError("data.tokenizer=bpe: there is no training text to train the BPE on")
    h = hashlib.sha256()
    for t in train_texts:
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    key = hashlib.sha256(json.dumps([h.hexdigest(), vocab_size, "bytelevel-bpe-v1"]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        tok = BPETokenizer.load(path)
        cached = True
    else:
        tok = BPETokenizer.train(train_texts, vocab_size)
        cached = False
        if path is not None:
            tok.save(path)
    return tok, {"tokenizer": tok.name, "tokenizer_path": str(path) if path else None, "tokenizer_cached": cached}
