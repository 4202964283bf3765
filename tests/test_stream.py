"""DocumentStream: order, new_doc, padding, loss_mask, idle slots, resume and rank partition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memtrans.data import Batch, DocumentStream, TokenizedDocs


def make_docs(lengths, with_tags=False):
    arrays = [(np.arange(n) + 1000 * i) % 65536 for i, n in enumerate(lengths)]
    tags = [np.where(np.arange(n) % 7 == 0, i, -1) for i, n in enumerate(lengths)] if with_tags else None
    return TokenizedDocs.from_arrays([a.astype(np.uint16) for a in arrays], [f"d{i}" for i in range(len(lengths))],
                                     tags)


def reconstruct(stream, n_docs):
    """Follow every slot: concatenated (tokens, targets) per document, plus how many times each was started."""
    got: dict[int, list] = {}
    starts = np.zeros(n_docs, dtype=int)
    for batch in stream:
        for b in range(batch.tokens.shape[0]):
            d = int(batch.doc_index[b])
            if d < 0:
                assert not batch.loss_mask[b].any() and not batch.new_doc[b]
                continue
            m = batch.loss_mask[b]
            if batch.new_doc[b]:
                assert int(batch.positions[b]) == 0
                starts[d] += 1
                got[d] = []
            assert int(batch.positions[b]) == sum(len(x) for x in got[d])
            # mask is a prefix; padding is zero
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()
            assert (batch.tokens[b, n:] == 0).all() and (batch.targets[b, n:] == 0).all()
            got[d].append(batch.tokens[b, :n].numpy())
            if n:
                assert (batch.targets[b, :n - 1] == batch.tokens[b, 1:n]).all()
    return {d: np.concatenate(v) for d, v in got.items()}, starts


def test_eval_stream_reads_every_document_once_in_order():
    lengths = [1, 37, 5, 64, 2, 130, 9, 65]
    docs = make_docs(lengths)
    stream = DocumentStream(docs, batch_size=3, segment_len=16, seed=3, loop=False)
    got, starts = reconstruct(stream, len(lengths))
    assert starts[0] == 0  # a 1-token document has nothing to predict: skipped
    assert (starts[1:] == 1).all()
    for d, toks in got.items():
        assert (toks == docs.tokens(d)[:-1].astype(np.int64)).all()  # each document in order, all L-1 inputs


def test_batch_types_shapes_and_first_batch():
    docs = make_docs([40, 40, 40], with_tags=True)
    batch = next(iter(DocumentStream(docs, batch_size=2, segment_len=8, seed=0)))
    assert isinstance(batch, Batch)
    assert batch.tokens.shape == (2, 8) and batch.tokens.dtype == torch.long and batch.targets.dtype == torch.long
    assert batch.loss_mask.dtype == torch.bool and batch.new_doc.dtype == torch.bool and batch.new_doc.all()
    assert batch.doc_index.dtype == torch.long and batch.positions.dtype == torch.long
    assert batch.tags.dtype == torch.long and batch.tags.shape == (2, 8)
    for b in range(2):
        d = int(batch.doc_index[b])
        assert batch.tags[b].tolist() == docs.tags(d)[:8].tolist()


def test_new_doc_and_padding_on_document_end():
    docs = make_docs([11])  # 10 predictions: segments of 4, 4, 2(+2 padding)
    stream = DocumentStream(docs, batch_size=1, segment_len=4, seed=0, loop=True)
    bs = [next(stream) for _ in range(4)]
    assert [bool(b.new_doc[0]) for b in bs] == [True, False, False, True]
    assert [int(b.positions[0]) for b in bs] == [0, 4, 8, 0]
    assert bs[2].loss_mask[0].tolist() == [True, True, False, False]
    assert bs[2].targets[0, :2].tolist() == [9, 10]


def test_loop_epochs_reshuffle_and_cover_all():
    docs = make_docs([3] * 20)  # each document is exactly one segment
    stream = DocumentStream(docs, batch_size=1, segment_len=2, seed=1, loop=True)
    order = [int(next(stream).doc_index[0]) for _ in range(60)]
    e0, e1, e2 = order[:20], order[20:40], order[40:]
    assert sorted(e0) == sorted(e1) == sorted(e2) == list(range(20))
    assert e0 != e1 and e0 != list(range(20))
    again = DocumentStream(docs, batch_size=1, segment_len=2, seed=1, loop=True)
    assert [int(next(again).doc_index[0]) for _ in range(60)] == order
    other = DocumentStream(docs, batch_size=1, segment_len=2, seed=2, loop=True)
    assert [int(next(other).doc_index[0]) for _ in range(20)] != e0


@pytest.mark.parametrize("loop", [True, False])
def test_resume_is_exact_mid_document(loop):
    rng = np.random.default_rng(0)
    docs = make_docs(list(rng.integers(2, 90, size=23)), with_tags=True)
    kw = dict(batch_size=3, segment_len=7, seed=5, loop=loop)
    ref = DocumentStream(docs, **kw)
    full = [next(ref) for _ in range(40)]
    for n in (0, 1, 13, 17):
        s = DocumentStream(docs, **kw)
        for _ in range(n):
            next(s)
        state = s.state_dict()
        resumed = DocumentStream(docs, **kw)
        resumed.load_state_dict(state)
        for want in full[n:n + 15]:
            got = next(resumed)
            for name in ("tokens", "targets", "loss_mask", "new_doc", "doc_index", "positions", "tags"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (n, name)
    with pytest.raises(ValueError, match="segment_len"):
        DocumentStream(docs, batch_size=3, segment_len=8, seed=5, loop=loop).load_state_dict(state)


def test_rank_partition_disjoint_and_complete():
    docs = make_docs([20] * 11)
    seen = []
    for rank in range(3):
        s = DocumentStream(docs, batch_size=2, segment_len=8, seed=0, loop=False, rank=rank, world_size=3)
        mine = {int(d) for b in s for d in b.doc_index if d >= 0}
        assert all(d % 3 == rank for d in mine)
        seen.append(mine)
    assert set().union(*seen) == set(range(11)) and sum(map(len, seen)) == 11


def test_idle_slots_and_stop():
    docs = make_docs([9, 9])
    batches = list(DocumentStream(docs, batch_size=4, segment_len=4, seed=0, loop=False))
    assert len(batches) == 2
    for b in batches:
        assert (b.doc_index >= 0).sum() == 2
        idle = b.doc_index < 0
        assert not b.loss_mask[idle].any() and not b.new_doc[idle].any() and (b.tags[idle] == -1).all()
    with pytest.raises(ValueError):
        DocumentStream(make_docs([1]), batch_size=1, segment_len=4, loop=True)


def test_stream_is_fast():
    docs = make_docs([100_000] * 4)
    s = DocumentStream(docs, batch_size=4, segment_len=512, seed=0)
    import time

    t = time.perf_counter()
    n = sum(1 for _ in zip(range(300), s))
    assert n == 300 and time.perf_counter() - t < 5.0
