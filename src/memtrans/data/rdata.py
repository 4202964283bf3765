"""A small reader for R's serialization format (XDR, versions 2 and 3) and lazy-load databases.

Enough to read the data of R packages such as janeaustenr (character vectors, lists, attributes),
without R. `read_lazyload_db(dir, "Rdata")` returns {variable name: python object}; `unserialize(bytes)`
reads one serialized object (an `.rds` payload or an `.rda` body after the "RDX2\\n" / "RDX3\\n" line).

Mapping: character vector -> list[str | None]; logical/integer/double vectors -> list; list -> list;
pairlist -> list of (tag, value); symbol -> RSymbol. Attributes are dropped except `names`, which
turns a generic vector into a dict when every element has a distinct name.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any


class RSymbol(str):
    pass


_NULLISH = {242, 241, 253, 252, 251, 250}  # empty/base/global env, unbound, missing, base namespace


class _Reader:
    def __init__(self, data: bytes):
        self.b = data
        self.i = 0
        self.refs: list[Any] = []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.b[:2]
        if fmt != b"X\n":
            raise ValueError(f"unsupported R serialization format {fmt!r} (only XDR 'X\\n' is supported)")
        self.i = 2
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self) -> Any:  # noqa: C901 - a dispatch table on SEXP types
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t == 254 or t in _NULLISH:
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t in (247, 248, 249):  # PERSISTSXP, PACKAGESXP, NAMESPACESXP: a string vector
            self.int()
            vals = [self.item() for _ in range(self.int())]
            self.refs.append(vals)
            return vals
        if t == 1:  # SYMSXP
            sym = RSymbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like: iterate the cdr chain
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                flags = self.int()
                t, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if t not in (2, 3, 5, 6, 17, 239, 240):
                    self.i -= 4
                    self.item()  # the terminating cdr (normally NULL)
                    return out
        if t == 4:  # ENVSXP
            self.int()
            env: dict = {}
            self.refs.append(env)
            self.item()
            frame, table = self.item(), self.item()
            self.item()
            chains = [frame] + (list(table) if isinstance(table, list) else [])
            for chain in chains:
                for entry in chain if isinstance(chain, list) else []:
                    if isinstance(entry, tuple):
                        env[str(entry[0])] = entry[1]
            return env
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n]
            self.i += n
            latin1 = bool((flags >> 12) & 4)
            return s.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if t == 238:  # ALTREP: (class info, state, attributes)
            info, state = self.item(), self.item()
            self.item()
            cls = str(info[0][1]) if isinstance(info, list) and info else ""
            if cls == "compact_intseq":
                n, start, step = (int(x) for x in state)
                return list(range(start, start + n * step, step))
            if cls == "compact_realseq":
                n, start, step = state
                return [start + k * step for k in range(int(n))]
            if cls.startswith("wrap_"):
                return state[0] if isinstance(state, list) else state
            if cls == "deferred_string":
                vec = state[0][1] if isinstance(state, list) and state and isinstance(state[0], tuple) else state
                return [None if v is None else (str(int(v)) if float(v).is_integer() else repr(v)) for v in vec]
            raise ValueError(f"unsupported ALTREP class {cls!r}")
        if t in (10, 13):  # logical, integer
            n = self.length()
            vals = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
            value: Any = [None if v == -2147483648 else v for v in vals]
        elif t == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t == 15:  # complex
            n = self.length()
            raw = struct.unpack_from(f">{2 * n}d", self.b, self.i)
            self.i += 16 * n
            value = [complex(raw[2 * k], raw[2 * k + 1]) for k in range(n)]
        elif t == 24:  # raw
            n = self.length()
            value = self.b[self.i:self.i + n]
            self.i += n
        elif t in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(self.length())]
        elif t in (7, 8):  # special/builtin function: a name
            n = self.int()
            value = self.b[self.i:self.i + n].decode()
            self.i += n
        elif t == 25:  # S4 object: attributes only
            value = None
        else:
            raise ValueError(f"unsupported R object type {t}")
        if has_attr:
            attrs = self.item()
            names = dict((str(k), v) for k, v in attrs if k is not None).get("names") if isinstance(attrs, list) else None
            if t == 19 and names and len(names) == len(value) and len(set(names)) == len(names):
                value = dict(zip(names, value))
        return value


def unserialize(data: bytes) -> Any:
    """Read one R-serialized object (XDR format) from `data`."""
    r = _Reader(data)
    r.header()
    return r.item()


def read_rds(path: str | Path) -> Any:
    """Read an `.rds` file (gzip, bzip2, xz or uncompressed)."""
    return unserialize(_decompress_file(Path(path).read_bytes()))


def read_rda(path: str | Path) -> dict[str, Any]:
    """Read an `.rda` / `.RData` file: {variable name: value}."""
    data = _decompress_file(Path(path).read_bytes())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise ValueError(f"{path}: not an R data file (starts with {data[:5]!r})")
    pairs = unserialize(data[5:])
    return {str(k): v for k, v in pairs}


def read_lazyload_db(directory: str | Path, stem: str = "Rdata") -> dict[str, Any]:
    """Read an R lazy-load database (`stem.rdx` index + `stem.rdb` blobs), as in installed packages' data/."""
    directory = Path(directory)
    index = unserialize(_decompress_file((directory / f"{stem}.rdx").read_bytes()))
    blob = (directory / f"{stem}.rdb").read_bytes()
    variables = index["variables"] if isinstance(index, dict) else dict(zip(*index))
    compressed = index.get("compressed", [True]) if isinstance(index, dict) else [True]
    kind = int(compressed[0]) if compressed and compressed[0] is not None else 1
    out = {}
    for name, (offset, length) in variables.items():
        chunk = blob[int(offset):int(offset) + int(length)]
        out[name] = unserialize(_decompress_chunk(chunk, kind))
    return out


def _decompress_file(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def _decompress_chunk(chunk: bytes, kind: int) -> bytes:
    """One lazy-load blob: 4-byte big-endian length, then (kind 2/3: a type byte) the compressed data."""
    if kind in (0, 1) or kind is True:
        return zlib.decompress(chunk[4:])
    typ, body = chunk[4:5], chunk[5:]
    if typ == b"Z":
        return zlib.decompress(body)
    if typ == b"2":
        return bz2.decompress(body)
    if typ == b"X":
        return lzma.decompress(body)
    if typ == b"0":
        return body
    raise ValueError(f"unknown lazy-load compression type {typ!r}")
