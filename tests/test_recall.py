"""The synthetic recall task: format, tags, distances, determinism, chance level."""
from __future__ import annotations

import re

import numpy as np
import pytest

from memtrans.config import DataConfig
from memtrans.data import DocumentStream, prepare_data
from memtrans.data.recall import generate_recall_document, recall_info

SMALL = dict(recall_docs=12, recall_doc_len=3000, recall_pairs=5, recall_key_len=3, recall_value_len=3,
             recall_min_distance=1200)


def test_tags_point_at_bound_values():
    cfg = DataConfig(**SMALL)
    for i in range(4):
        text, tags = generate_recall_document(cfg, i)
        assert len(text) == cfg.recall_doc_len and text.isascii() and len(tags) == len(text)
        bindings = dict(re.findall(r"key ([A-Z]{3}) = ([0-9]{3}) \.", text))
        queries = re.findall(r"([A-Z]{3}) \? ([0-9]{3}) \.", text)
        assert len(bindings) == cfg.recall_pairs and sorted(k for k, _ in queries) == sorted(bindings)
        assert all(bindings[k] == v for k, v in queries)
        pos = np.nonzero(tags >= 0)[0]
        assert len(pos) == cfg.recall_pairs * cfg.recall_value_len
        for p in pos:
            d = int(tags[p])
            target = text[p + 1]
            assert target.isdigit() and text[p + 1 - d] == target  # the target equals the bound value char
            assert d >= cfg.recall_min_distance
            # the binding char is inside "key K = VVV" and the query char inside "K ? VVV"
            assert text[:p + 2].rstrip("0123456789").endswith(" ? ")
            assert re.search(r"key [A-Z]{3} = [0-9]*$", text[:p + 2 - d])
            # the distance is exact: the key before the binding equals the key before the query
            qkey = re.search(r"([A-Z]{3}) \? [0-9]*$", text[:p + 2]).group(1)
            bkey = re.search(r"key ([A-Z]{3}) = [0-9]*$", text[:p + 2 - d]).group(1)
            assert qkey == bkey


def test_deterministic_and_filler_is_unpredictable():
    cfg = DataConfig(**SMALL)
    a, ta = generate_recall_document(cfg, 3)
    b, tb = generate_recall_document(cfg, 3)
    c, _ = generate_recall_document(cfg, 4)
    assert a == b and (ta == tb).all() and a != c
    d, _ = generate_recall_document(DataConfig(**SMALL, recall_seed=1), 3)
    assert d != a
    filler = re.sub(r"key [A-Z]+ = [0-9]+ \.|[A-Z]+ \? [0-9]+ \.", "", a)
    assert set(filler) <= set("abcdefghijklmnopqrstuvwxyz ") and len(set(filler)) == 27
    assert recall_info(cfg)["chance"] == pytest.approx(0.1)


def test_too_short_documents_rejected():
    with pytest.raises(ValueError, match="recall_doc_len"):
        generate_recall_document(DataConfig(recall_doc_len=500, recall_min_distance=400), 0)


def test_prepare_recall_and_stream_tags(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), **SMALL)
    b = prepare_data(cfg, seed=0)
    assert b.info["chance"] == pytest.approx(0.1) and b.info["recall"]["min_distance"] == 1200
    assert b.info["tokenizer"] == "byte" and sum(b.info["docs"].values()) == 12
    train = b.splits["train"]
    stream = DocumentStream(train, batch_size=2, segment_len=256, seed=0, loop=False)
    scored = 0
    for batch in stream:
        for s in range(2):
            d = int(batch.doc_index[s])
            if d < 0:
                continue
            toks = train.tokens(d)
            for t in np.nonzero(batch.tags[s].numpy() >= 0)[0]:
                p = int(batch.positions[s]) + t
                dist = int(batch.tags[s, t])
                assert int(batch.targets[s, t]) == toks[p + 1] == toks[p + 1 - dist]
                assert dist > 2 * 256  # far beyond the XL window of two segments
                scored += 1
    assert scored == len(train) * SMALL["recall_pairs"] * SMALL["recall_value_len"]
    with pytest.raises(ValueError, match="tokenizer=byte"):
        prepare_data(DataConfig(cache_dir=str(tmp_path), tokenizer="bpe", **SMALL))


def test_recall_pieces_drop_unanswerable_tags(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), max_doc_tokens=1000, **SMALL)
    b = prepare_data(cfg)
    for split in b.splits.values():
        for i in range(len(split)):
            toks, tags = split.tokens(i), split.tags(i)
            for p in np.nonzero(tags >= 0)[0]:
                assert p + 1 - tags[p] >= 0 and toks[p + 1] == toks[p + 1 - tags[p]]


FUSED = dict(recall_layout="fused", recall_docs=4, recall_doc_len=400, recall_pairs=6, recall_key_len=1,
             recall_value_len=1, recall_min_distance=150)


def test_fused_layout_tags_point_at_binding_tokens():
    from memtrans.data.recall import FUSED_KEYS, fused_binding_token
    cfg = DataConfig(**FUSED)
    for i in range(3):
        text, tags = generate_recall_document(cfg, i)
        b = text.encode("utf-8")
        assert len(b) == len(tags) == cfg.recall_doc_len
        pos = np.nonzero(tags >= 0)[0]
        assert len(pos) == cfg.recall_pairs
        seen_keys = set()
        for p in pos:
            key, value = chr(b[p]), chr(b[p + 1])  # the query: key letter, then its value digit (the target)
            assert key in FUSED_KEYS and value.isdigit()
            d = int(tags[p])
            assert d >= cfg.recall_min_distance
            # the token d back from the target is the binding of exactly this key and value, after 0xC3
            assert b[p + 1 - d] == fused_binding_token(FUSED_KEYS.index(key), int(value)) and b[p - d] == 0xC3
            seen_keys.add(key)
        assert len(seen_keys) == cfg.recall_pairs  # every key is queried once
        # no other byte in the document is a binding token or a key letter
        others = np.delete(np.frombuffer(b, np.uint8), np.concatenate([pos, pos + 1, pos + 1 - tags[pos], pos - tags[pos]]))
        assert set(others.tolist()) <= set(range(ord("a"), ord("z") + 1)) | {ord(" ")}


def test_fused_layout_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="recall_layout=fused needs"):
        generate_recall_document(DataConfig(**{**FUSED, "recall_pairs": 7}), 0)
    with pytest.raises(ValueError, match="recall_layout=fused needs"):
        generate_recall_document(DataConfig(**{**FUSED, "recall_value_len": 2}), 0)
    with pytest.raises(ValueError, match="recall_layout"):
        generate_recall_document(DataConfig(**{**FUSED, "recall_layout": "bytes"}), 0)


@pytest.mark.parametrize("layout, extra", [("text", dict(recall_pairs=4)), ("fused", dict(recall_key_len=1, recall_value_len=1,
                                                                         recall_pairs=6))])
def test_min_query_distance_bounds_every_generated_query(layout, extra):
    from memtrans.data.recall import min_query_distance

    cfg = DataConfig(recall_layout=layout, recall_doc_len=400, recall_min_distance=120, recall_docs=200, **extra)
    closest = min(int(t[t > 0].min()) for _, t in (generate_recall_document(cfg, i) for i in range(cfg.recall_docs)))
    assert min_query_distance(cfg) <= closest
    if layout == "fused":  # nearly attained: the last binding queried first right after a short middle filler
        assert closest <= min_query_distance(cfg) + 2


def test_recall_within_local_reach_is_rejected_naming_the_fields():
    from memtrans.config import config_from_dict
    from memtrans.data.recall import check_beyond_local_reach

    def cfg(**model):
        return config_from_dict({"model": {"segment_len": 32, "depth": 2, "dim": 64, "heads": 4, "head_dim": 16,
                                           **model},
                                 "data": {"corpus": "recall", "recall_layout": "fused", "recall_pairs": 6,
                                          "recall_key_len": 1, "recall_value_len": 1, "recall_doc_len": 256,
                                          "recall_min_distance": 100}})
    check_beyond_local_reach(cfg())  # closest query 102 tokens back; reach 32 x 3 - 1 = 95, far from 97
    with pytest.raises(ValueError) as e:
        check_beyond_local_reach(cfg(depth=3))  # reach 127
    msg = str(e.value)
    for part in ("data.recall_min_distance=100", "102 tokens", "model.segment_len 32", "model.depth 3",
                 "127 tokens", "data.recall_min_distance >= 127"):
        assert part in msg, (part, msg)
    check_beyond_local_reach(cfg(depth=3, xl_cache=False))  # no cache: reach 31
