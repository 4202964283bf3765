"""Fetch the study corpora once (needs network and apt-get): `memtrans fetch-corpus NAME ...`.

Each corpus comes from a Debian package, downloaded with `apt-get download` (no dependencies, nothing
installed) and unpacked with `dpkg-deb -x`, then normalised to one UTF-8 text file per document:

    <dest>/manifest.json   {"name", "created", "packages": [{"package", "version", "deb", "sha256"}],
                            "documents": [{"id", "file", "bytes", "sha256", "source"}], "total_bytes", ...}
    <dest>/docs/NNNN-ID.txt

`load_corpus` reads `<cache_dir>/corpora/NAME` (see `memtrans.data.corpus.load_fetched`).

| name     | package              | one document =                                                     |
|----------|----------------------|--------------------------------------------------------------------|
| austen   | r-cran-janeaustenr   | a novel (R lazy-load data, read by `memtrans.data.rdata`)          |
| metamath | metamath-databases   | a part/chapter of a `.mm` database (split at `####`/`#*#*` headers) |
| code     | hol-light            | a top-level directory (or top-level file) of `.ml` sources        |
| tex      | pari-doc             | a TeX manual file                                                  |
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memtrans.data.corpus import default_cache_dir, load_dirdocs, read_text_file
from memtrans.utils import atomic_write_json, atomic_write_text

DocList = list[tuple[str, str, str]]  # (id, text, source path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- extractors (root = unpacked package tree)

def extract_austen(root: Path) -> DocList:
    """Jane Austen's novels from janeaustenr's R data (lazy-load db `Rdata.rdx/.rdb`, or `.rda` files)."""
    from memtrans.data.rdata import read_lazyload_db, read_rda

    objects: dict = {}
    sources: dict = {}
    for rdx in sorted(root.rglob("Rdata.rdx")):
        for k, v in read_lazyload_db(rdx.parent, "Rdata").items():
            objects[k], sources[k] = v, str(rdx.relative_to(root))
    for rda in sorted(list(root.rglob("*.rda")) + list(root.rglob("*.RData"))):
        for k, v in read_rda(rda).items():
            objects[k], sources[k] = v, str(rda.relative_to(root))
    docs = []
    for name in sorted(objects):
        v = objects[name]
        if isinstance(v, list) and v and all(x is None or isinstance(x, str) for x in v):
            docs.append((name, "\n".join(x or "" for x in v) + "\n", sources[name]))
    if not docs:
        raise ValueError(f"austen: no character vectors found in the R data under {root}")
    return docs


_MM_HEADER = re.compile(r"^\$\(\s*\n(####|#\*#\*)", re.MULTILINE)


def split_metamath(text: str, min_chars: int = 2048) -> list[tuple[str, str]]:
    """Split a Metamath database at its part (`####`) and chapter (`#*#*`) header comments.

    Returns (title, text) pieces that concatenate back to `text`; pieces shorter than `min_chars`
    (e.g. a part header directly followed by a chapter header) are merged into the next piece.
    """
    starts = [0] + [m.start() for m in _MM_HEADER.finditer(text) if m.start() > 0] + [len(text)]
    pieces = [text[a:b] for a, b in zip(starts, starts[1:]) if b > a]
    merged: list[str] = []
    carry = ""
    for p in pieces:
        carry += p
        if len(carry) >= min_chars:
            merged.append(carry)
            carry = ""
    if carry:
        if merged:
            merged[-1] += carry
        else:
            merged.append(carry)
    out = []
    for p in merged:
        m = _MM_HEADER.search(p)
        title = ""
        if m:
            lines = p[m.start():].splitlines()
            title = next((ln.strip() for ln in lines[2:6] if ln.strip() and not ln.startswith(("####", "#*#*"))), "")
        out.append((title, p))
    return out


def extract_metamath(root: Path) -> DocList:
    docs = []
    for f in sorted(list(root.rglob("*.mm")) + list(root.rglob("*.mm.gz")), key=lambda p: p.as_posix()):
        text, _ = read_text_file(f)
        stem = f.name.split(".mm")[0]
        for k, (_title, piece) in enumerate(split_metamath(text)):
            docs.append((f"{stem}/{k:03d}", piece, str(f.relative_to(root))))
    if not docs:
        raise ValueError(f"metamath: no .mm files under {root}")
    return docs


def extract_code(root: Path) -> DocList:
    """HOL Light: one document per top-level directory (its .ml files concatenated) or top-level .ml file."""
    mls = sorted(root.rglob("*.ml"))
    if not mls:
        raise ValueError(f"code: no .ml files under {root}")
    base = next((p for p in (root / "usr/share/hol-light", root / "usr/lib/hol-light") if p.is_dir()), None)
    if base is None:
        base = Path(os.path.commonpath([str(p.parent) for p in mls]))
    return [(d.id, d.text, str(Path(d.meta["path"]).relative_to(root)))
            for d in load_dirdocs(base, suffixes=(".ml",))]


def extract_tex(root: Path) -> DocList:
    files = sorted(list(root.rglob("*.tex")) + list(root.rglob("*.tex.gz")), key=lambda p: p.as_posix())
    if not files:
        raise ValueError(f"tex: no .tex files under {root}")
    return [(f.name.split(".tex")[0], read_text_file(f)[0], str(f.relative_to(root))) for f in files]


CORPORA: dict[str, dict] = {
    "austen": {"packages": ["r-cran-janeaustenr"], "extract": extract_austen, "licence": "MIT / public domain"},
    "metamath": {"packages": ["metamath-databases"], "extract": extract_metamath, "licence": "CC0"},
    "code": {"packages": ["hol-light"], "extract": extract_code, "licence": "BSD-2-Clause"},
    "tex": {"packages": ["pari-doc"], "extract": extract_tex, "licence": "GPL-2+"},
}


# ---------------------------------------------------------------- writing

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "doc"


def write_corpus(dest_dir: str | Path, name: str, docs: DocList, packages: list[dict],
                 extra: dict | None = None) -> dict:
    """Write documents and manifest.json (with sha256 of every file) into dest_dir; returns the manifest."""
    dest = Path(dest_dir)
    docs_dir = dest / "docs"
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    entries = []
    for k, (doc_id, text, source) in enumerate(docs):
        rel = f"docs/{k:04d}-{_safe(doc_id)}.txt"
        data = text.encode("utf-8", errors="replace")
        atomic_write_text(dest / rel, data.decode("utf-8"))
        entries.append({"id": doc_id, "file": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "source": source})
    manifest = {"name": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "packages": packages, "documents": entries, "num_documents": len(entries),
                "total_bytes": sum(e["bytes"] for e in entries), **(extra or {})}
    atomic_write_json(dest / "manifest.json", manifest)  # written last: its presence marks a complete fetch
    return manifest


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def apt_download(package: str, workdir: Path) -> Path:
    """`apt-get download PACKAGE` into workdir (running `apt-get update` once if the first try fails)."""
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not available: fetch the corpus on a Debian/Ubuntu machine, or pass --deb FILE")
    r = _run(["apt-get", "download", package], workdir)
    if r.returncode != 0:
        _run(["apt-get", "update"], workdir)
        r = _run(["apt-get", "download", package], workdir)
    debs = sorted(workdir.glob(f"{package.split('=')[0]}_*.deb"))
    if r.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed: {r.stderr.strip()[-500:]}")
    return debs[-1]


def unpack_deb(deb: Path, root: Path) -> dict:
    """`dpkg-deb -x` the package into root; returns its manifest entry (package, version, sha256)."""
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError("dpkg-deb is not available (a Debian/Ubuntu tool)")
    info = {}
    for field in ("Package", "Version"):
        r = _run(["dpkg-deb", "-f", str(deb), field], deb.parent)
        info[field.lower()] = r.stdout.strip()
    r = _run(["dpkg-deb", "-x", str(deb), str(root)], deb.parent)
    if r.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {deb} failed: {r.stderr.strip()[-500:]}")
    return {"package": info["package"], "version": info["version"], "deb": deb.name, "sha256": _sha256_file(deb)}


def fetch_corpus(name: str, dest_dir: str | Path | None = None, debs: list[str | Path] | None = None) -> dict:
    """Download (or take the given `.deb` files), unpack and normalise corpus `name` into `dest_dir`
    (default `<cache_dir>/corpora/NAME`, where `load_corpus` looks). Returns the manifest dict, also
    written to `dest_dir/manifest.json` with package versions and sha256 checksums."""
    if name not in CORPORA:
        raise ValueError(f"fetch-corpus: unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    spec = CORPORA[name]
    dest = Path(dest_dir) if dest_dir is not None else default_cache_dir() / "corpora" / name
    with tempfile.TemporaryDirectory(prefix=f"memtrans-fetch-{name}-") as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        files = [Path(d).resolve() for d in debs] if debs else [apt_download(p, work) for p in spec["packages"]]
        packages = [unpack_deb(deb, root) for deb in files]
        docs = spec["extract"](root)
    return write_corpus(dest, name, docs, packages, {"licence": spec["licence"]})


def fetch_main(argv: list[str]) -> int:
    """`memtrans fetch-corpus NAME [NAME ...] [--dest DIR] [--deb FILE]`: returns an exit status."""
    ap = argparse.ArgumentParser(prog="memtrans fetch-corpus",
                                 description="Download a study corpus (Debian package) into the memtrans cache.")
    ap.add_argument("names", nargs="+", choices=sorted(CORPORA), metavar="NAME",
                    help=f"corpus to fetch: {', '.join(sorted(CORPORA))}")
    ap.add_argument("--dest", default=None,
                    help="root directory; each corpus goes to DEST/NAME (default: <cache_dir>/corpora, "
                         "cache_dir = $MEMTRANS_CACHE or ~/.cache/memtrans)")
    ap.add_argument("--deb", action="append", default=None,
                    help="use this already downloaded .deb instead of apt-get (only with one NAME)")
    args = ap.parse_args(argv)
    if args.deb and len(args.names) != 1:
        ap.error("--deb works with exactly one NAME")
    base = Path(args.dest) if args.dest else default_cache_dir() / "corpora"
    status = 0
    for name in args.names:
        try:
            m = fetch_corpus(name, base / name, args.deb)
        except (RuntimeError, ValueError, OSError) as e:
            print(f"fetch-corpus {name}: {e}", file=sys.stderr)
            status = 1
            continue
        pk = ", ".join(f"{p['package']} {p['version']}" for p in m["packages"])
        print(f"{name}: {m['num_documents']} documents, {m['total_bytes']} bytes from {pk} -> {base / name}")
    return status


main = fetch_main  # `memtrans fetch-corpus` (memtrans.cli) calls module.main(argv)
