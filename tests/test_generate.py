"""Incremental decoding (model.extend / model.generate) against one teacher-forced forward, sampling, and the
`memtrans generate` command."""
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from memtrans import MemorizingTransformer, ModelConfig
from memtrans.config import GATES
from memtrans.model.transformer import sample_next

SEG, V = 8, 32


def make(gate="learned_scalar", qk_norm=True, memory_layers=(0, 2), seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=V, dim=32, depth=3, heads=2, head_dim=16, segment_len=SEG, memory_layers=memory_layers,
                memory_size=12, knn_k=4, gate=gate, qk_norm=qk_norm, memory_dtype="float32", score_dtype="float32")
    args.update(kw)
    model = MemorizingTransformer(ModelConfig(**args))
    with torch.no_grad():  # gates that mix memory in visibly (at init several are exact averages)
        for name, p in model.named_parameters():
            if "gate" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def teacher_forced(model, doc):
    """The training forward over consecutive segment_len chunks: logits [B, L, V] and the final state."""
    state, out = model.init_state(doc.shape[0]), []
    for s in range(0, doc.shape[1], SEG):
        logits, state = model(doc[:, s:s + SEG], state)
        out.append(logits)
    return torch.cat(out, 1), state


@torch.no_grad()
def incremental(model, doc, chunks):
    """model.extend over chunks of the given sizes, then one token at a time."""
    state, out, t = model.init_state(doc.shape[0]), [], 0
    for n in chunks:
        logits, state = model.extend(doc[:, t:t + n], state)
        out.append(logits)
        t += n
    while t < doc.shape[1]:
        logits, state = model.extend(doc[:, t:t + 1], state)
        out.append(logits)
        t += 1
    return torch.cat(out, 1), state


def doc_of(length, seed=1, batch=2):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("gate", GATES)
def test_token_by_token_equals_teacher_forced_forward(gate, qk_norm):
    # 5 segments + 3 tokens with a 12-entry memory: the ring wraps three times; a prompt of 5 tokens leaves
    # a partial segment, then every later token is decoded alone across four segment boundaries.
    model = make(gate, qk_norm)
    doc = doc_of(5 * SEG + 3)
    ref, _ = teacher_forced(model, doc)
    inc, state = incremental(model, doc, [5])
    assert (inc - ref).abs().max() < 1e-5
    # The same ring as after the 5 whole segments (the pending 3 tokens are not written yet).
    _, ref_state = teacher_forced(model, doc[:, :5 * SEG])
    for i, mem in state.memories.items():
        other = ref_state.memories[i]
        assert torch.equal(mem.count, other.count) and torch.equal(mem.ptr, other.ptr)
        torch.testing.assert_close(mem.keys, other.keys, rtol=0, atol=1e-6)
        assert torch.equal(mem.positions, other.positions)
    assert int(mem.count[0]) == 12 and int(mem.ptr[0]) == (5 * SEG) % 12


def test_chunks_of_any_size_across_boundaries_and_no_xl_cache():
    doc = doc_of(6 * SEG + 1, seed=3)
    for kw in ({}, {"xl_cache": False}):
        model = make(**kw)
        ref, _ = teacher_forced(model, doc)
        inc, _ = incremental(model, doc, [3, 1, 2 * SEG + 1, SEG, 5, 7])  # 3+1+17+8+5+7 = 41, then 8 single tokens
        assert (inc - ref).abs().max() < 1e-5, kw


def test_the_comparison_sees_a_wrong_segment_alignment():
    # Feeding the partial prompt as a segment of its own (written to memory, rolled into the XL cache) is
    # what a naive decoder does; the logits that follow must then differ, or the tests above prove nothing.
    model = make()
    doc = doc_of(3 * SEG, seed=4)
    ref, _ = teacher_forced(model, doc)
    with torch.no_grad():
        state = model.init_state(2)
        _, state = model(doc[:, :5], state)
        wrong, _ = model.extend(doc[:, 5:], state)
    assert (wrong - ref[:, 5:]).abs().max() > 1e-3


def test_partial_segment_state_saves_restores_and_guards():
    model = make()
    doc = doc_of(4 * SEG, seed=5)
    ref, _ = teacher_forced(model, doc)
    with torch.no_grad():
        _, state = model.extend(doc[:, :2 * SEG + 3], model.init_state(2))
        restored = model.load_state(state.state_dict())
        assert restored.pending_len == 3
        rest, _ = model.extend(doc[:, 2 * SEG + 3:], restored)
    assert (rest - ref[:, 2 * SEG + 3:]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="partial segment"):
        model(doc[:, :SEG], state)
    with pytest.raises(ValueError, match="partial segment"):
        model.reset_state(state, [0])
    model.reset_state(state, [0, 1])  # every slot starts a new document: the pending segment is dropped
    assert state.pending_len == 0 and state.window is None
    fresh, _ = model.extend(doc[:, :SEG], state)
    assert (fresh - ref[:, :SEG]).abs().max() < 1e-5


@torch.no_grad()
def test_greedy_generation_is_the_argmax_of_the_teacher_forced_logits_and_deterministic():
    model = make()
    prompt = doc_of(2 * SEG + 5, seed=6)
    new, state = model.generate(prompt, None, 3 * SEG, temperature=0)
    again, _ = model.generate(prompt, None, 3 * SEG, temperature=0)
    assert new.shape == (2, 3 * SEG) and torch.equal(new, again)
    full = torch.cat([prompt, new], 1)
    ref, _ = teacher_forced(model, full)
    assert torch.equal(ref[:, prompt.shape[1] - 1:-1].argmax(-1), new)
    assert int(state.positions[0]) == full.shape[1]  # the state has consumed prompt and continuation


@torch.no_grad()
def test_sampling_is_reproducible_under_a_seeded_generator():
    model = make()
    prompt = doc_of(SEG + 2, seed=7)
    draw = lambda seed, **kw: model.generate(prompt, None, 20, generator=torch.Generator().manual_seed(seed), **kw)[0]
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(3, top_k=5, top_p=0.9, temperature=0.7), draw(3, top_k=5, top_p=0.9, temperature=0.7))


def test_top_k_and_top_p_restrict_the_draw():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).expand(400, 5)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    # softmax: 0.64, 0.24, 0.09, ...: a nucleus of 0.8 holds tokens 1 and 2, of 0.5 token 1 only
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}
    assert torch.equal(sample_next(logits, 0.0), torch.ones(400, dtype=torch.long))
    for bad in ({"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_next(logits, **{"temperature": 1.0, **bad})


@torch.no_grad()
@pytest.mark.parametrize("on_host", [True, False])
def test_nan_logits_are_refused_not_sampled(on_host, monkeypatch):
    # argmax over NaN logits returns an id without complaint; generation must say the model is broken instead
    # (one read after decoding on the host, an asynchronous device assert where reads would synchronise)
    monkeypatch.setattr(MemorizingTransformer, "host_reads", on_host)
    model = make()
    prompt = doc_of(SEG + 3, seed=9)
    model.generate(prompt, None, 4, temperature=0)  # healthy weights: no complaint
    next(model.parameters()).fill_(float("nan"))
    for kw in ({"temperature": 0}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(0)}):
        with pytest.raises(ValueError if on_host else RuntimeError, match="NaN"):
            model.generate(prompt, None, 4, **kw)


@torch.no_grad()
def test_stop_token_ends_generation():
    model = make()
    prompt = doc_of(SEG, seed=8, batch=1)
    free, _ = model.generate(prompt, None, 12, temperature=0)
    stop = int(free[0, 4])
    first = int((free[0] == stop).nonzero()[0])
    cut, _ = model.generate(prompt, None, 12, temperature=0, stop=stop)
    assert torch.equal(cut[0], free[0, :first + 1])


@torch.no_grad()
def test_progress_reports_the_prompt_segment_by_segment():
    model = make()
    prompt = doc_of(2 * SEG + 5, seed=10, batch=1)
    seen = []
    _, state = model.generate(prompt, None, 2, temperature=0, progress=seen.append)
    assert seen == [SEG, SEG, 5]  # the prompt only, in the segments of the training forward
    _, state = model.extend(prompt[:, :3], model.init_state(1))  # mid-segment: first the rest of the segment
    seen.clear()
    model.generate(prompt, state, 0, progress=seen.append)
    assert seen == [SEG - 3, SEG, SEG]  # 5 + 8 + 8 = the 21 prompt tokens


@torch.no_grad()
def test_retrievals_describe_each_generated_token():
    model = make(memory_layers=(1,), memory_size=64)
    prompt = doc_of(3 * SEG + 2, seed=9, batch=1)
    records = []
    new, _ = model.generate(prompt, None, SEG, temperature=0, retrievals=records)
    assert len(records) == SEG and all(set(r) == {1} for r in records)
    for j, r in enumerate(records):
        r = r[1]
        assert r["positions"].shape == (1, 2, 4) and r["weights"].shape == (1, 2, 4) and r["share"].shape == (1, 2)
        here = prompt.shape[1] - 1 + j  # the query that predicted token j
        seg_start = here - here % SEG
        assert (r["positions"] < seg_start).all() and (r["positions"] >= 0).all()  # memory: earlier segments only
        torch.testing.assert_close(r["weights"].sum(-1), torch.ones(1, 2))
        assert ((r["share"] > 0) & (r["share"] < 1)).all()
        assert r["gate"].shape == (2,)
    # The teacher-forced diagnostics of the last prompt position agree with the first record.
    diag = {}
    state = model.init_state(1)
    _, state = model.extend(prompt[:, :3 * SEG], state)
    model.extend(prompt[:, 3 * SEG:], state, diag)
    assert torch.equal(diag[1]["retrieved_positions"][:, :, -1], records[0][1]["positions"])


@torch.no_grad()
def test_a_slot_reset_at_a_segment_boundary_then_decoding_and_a_reload_mid_segment():
    # Slot 0 starts a new document at a boundary: its XL cache is masked in the decoding windows (the
    # window's validity buffer) exactly as in the training forward; the state reloads mid-segment.
    model = make()
    doc = doc_of(4 * SEG + 3, seed=11)
    state, ref = model.init_state(2), []
    for i, s in enumerate(range(0, doc.shape[1], SEG)):
        if i == 2:
            model.reset_state(state, [0])
        logits, state = (model if s + SEG <= doc.shape[1] else model.extend)(doc[:, s:s + SEG], state)
        ref.append(logits)
    state, inc = model.init_state(2), []
    for t in range(doc.shape[1]):
        if t == 2 * SEG:
            model.reset_state(state, [0])
        if t == 2 * SEG + 3:
            state = model.load_state(state.state_dict())
        logits, state = model.extend(doc[:, t:t + 1], state)
        inc.append(logits)
    assert (torch.cat(inc, 1) - torch.cat(ref, 1)).abs().max() < 1e-5


class HostReads(TorchFunctionMode):
    """Counts tensor calls that read a value on the host (on a GPU: a synchronisation); see test_gpu_ready."""
    READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero"}

    def __init__(self):
        super().__init__()
        self.reads, self.calls = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self.calls += 1
        to_host = name == "to" and any(isinstance(a, str) and a.startswith("cpu") for a in (*args[1:], kwargs.get("device")))
        self.reads += name in self.READS or to_host
        return func(*args, **kwargs)


@pytest.fixture
def device_path(monkeypatch):
    """The code a GPU runs, on CPU: the torch reference retrieval, device-side checks, no torch.multinomial
    (whose two internal .item() calls no spy sees)."""
    from memtrans.memory import ExactMemory
    monkeypatch.setattr(ExactMemory, "use_fast", False)
    monkeypatch.setattr(MemorizingTransformer, "host_reads", False)

    def multinomial(*a, **k):
        raise AssertionError("torch.multinomial reads the distribution on the host")
    monkeypatch.setattr(torch, "multinomial", multinomial)


@torch.no_grad()
@pytest.mark.parametrize("sampled", [False, True])
def test_decoding_reads_the_host_once_per_16_tokens_at_most(device_path, sampled):
    model = make()
    prompt = doc_of(SEG + 3, seed=12)
    kw = dict(temperature=0.8, top_k=8, generator=torch.Generator().manual_seed(0)) if sampled else dict(temperature=0)
    n = 3 * SEG + 16 + 5  # 45 tokens across three segment boundaries (memory written, windows reopened)
    with HostReads() as spy:
        free, _ = model.generate(prompt, None, n, **kw)
    assert spy.calls > 20 * n and spy.reads == 0  # no stop: no host read at all
    never = V  # an id no row produces: the stop condition is read and never met
    with HostReads() as spy:
        again, _ = model.generate(prompt, None, n, stop=never, **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(again, free) and spy.reads == -(-n // 16)  # at 16, 32 and the last token
    with HostReads() as spy:  # the spy sees the per-token reads of stop_every=1
        model.generate(prompt, None, n, stop=never, stop_every=1, **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert spy.reads == n


@torch.no_grad()
@pytest.mark.parametrize("stop_every", [None, 16, 5, 1])
def test_stop_read_every_few_tokens_cuts_where_the_per_token_read_does(monkeypatch, stop_every):
    # Two rows stopping at different tokens: the output is cut after the token at which the second one
    # stopped, whichever token the stop condition was read at; the host path (one read per token) is the reference.
    model = make()
    prompt = doc_of(SEG + 3, seed=13)
    free, _ = model.generate(prompt, None, 40, temperature=0)
    stop = int(free[1, 20])  # a later token of row 1: row 0 holds it earlier, later or never
    hit = free == stop
    last = int(torch.where(hit.any(1), hit.int().argmax(1), 40).max())
    ref, ref_state = model.generate(prompt, None, 40, temperature=0, stop=stop)
    assert ref.shape[1] == min(last + 1, 40) and torch.equal(ref, free[:, :ref.shape[1]])
    monkeypatch.setattr(MemorizingTransformer, "host_reads", False)
    cut, state = model.generate(prompt, None, 40, temperature=0, stop=stop, stop_every=stop_every)
    assert torch.equal(cut, ref)
    every = 16 if stop_every is None else stop_every
    assert int(state.positions[0]) == prompt.shape[1] + min(-(-ref.shape[1] // every) * every, 40)
    with pytest.raises(ValueError, match="stop_every"):
        model.generate(prompt, None, 4, stop=stop, stop_every=0)


# ---- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory made by hand: config.yaml and a checkpoint of an untrained byte-level model."""
    from memtrans.config import config_from_dict, save_config
    from memtrans.train.checkpoint import checkpoint_path, save_checkpoint

    root = tmp_path_factory.mktemp("gen")
    cfg = config_from_dict({
        "model": {"vocab_size": 256, "dim": 32, "depth": 2, "heads": 2, "head_dim": 16, "segment_len": 16,
                  "memory_layers": [1], "memory_size": 64, "knn_k": 4, "memory_dtype": "float32",
                  "score_dtype": "float32"},
        "data": {"corpus": "recall", "cache_dir": str(root / "cache")},
        "train": {"precision": "fp32", "device": "cpu", "threads": 1}})
    run = root / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = MemorizingTransformer(cfg.model)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, checkpoint_path(run))
    return run


def test_cli_generates_and_shows_retrievals(run_dir, tmp_path, capsys):
    from memtrans.cli import main
    prompt = tmp_path / "p.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog; " * 2)  # 90 bytes: 5 segments, then a partial one
    args = ["generate", str(run_dir), "--prompt-file", str(prompt), "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--show-retrievals"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("  token ") == 5 and shown.count("layer 1: memory share") == 5
    assert "top entries:" in shown and "@" in shown
    assert "ending 'uick brown fox jumps over the lazy dog; '" in shown.splitlines()[0]  # its last 40 tokens
    assert shown.split("continuation:\n")[1] == plain  # the same greedy continuation, printed last


def test_cli_shows_a_progress_bar_while_reading_the_prompt_on_a_terminal(run_dir, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from memtrans.cli import main

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    prompt = tmp_path / "p.txt"
    prompt.write_text("x" * 90)
    args = ["generate", str(run_dir), "--prompt-file", str(prompt), "--max-new-tokens", "3", "--temperature", "0"]
    assert main(args) == 0
    assert "reading prompt" not in capsys.readouterr().err  # not a terminal (a log, a pipe): no bar
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(args) == 0
    err = term.getvalue()
    assert "reading prompt" in err and "/90" in err, err
    assert len(capsys.readouterr().out.strip().splitlines()) == 1  # the continuation alone on stdout


def test_cli_sampling_is_reproducible_by_seed(run_dir, tmp_path, capsys):
    from memtrans.cli import main
    prompt = tmp_path / "p.txt"
    prompt.write_text("abc " * 10)
    out = []
    for seed in (1, 1, 2):
        assert main(["generate", str(run_dir), "--prompt-file", str(prompt), "--max-new-tokens", "30",
                     "--seed", str(seed)]) == 0
        out.append(capsys.readouterr().out)
    assert out[0] == out[1] and out[0] != out[2]


@pytest.mark.parametrize("case", ["missing_run", "missing_prompt", "prompt_dir", "empty_prompt", "not_utf8", "bad_top_p",
                                  "bad_top_entries"])
def test_cli_bad_input_one_line_exit_2(case, run_dir, tmp_path, capsys):
    from memtrans.cli import main
    prompt = tmp_path / "p.txt"
    prompt.write_bytes({"empty_prompt": b"", "not_utf8": b"caf\xe9 au lait"}.get(case, b"hello"))
    run = tmp_path / "nope" if case == "missing_run" else run_dir
    path = {"missing_prompt": tmp_path / "absent.txt", "prompt_dir": tmp_path}.get(case, prompt)
    extra = {"bad_top_p": ["--top-p", "0"], "bad_top_entries": ["--top-entries", "-1"]}.get(case, [])
    assert main(["generate", str(run), "--prompt-file", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memtrans generate: error: ")
    expect = {"missing_run": "does not exist", "missing_prompt": "does not exist", "prompt_dir": "is a directory",
              "empty_prompt": "empty",
              "not_utf8": "offset 3 is not valid UTF-8", "bad_top_p": "top_p", "bad_top_entries": "--top-entries"}[case]
    assert expect in err[0]
