import json
import shutil

import pytest
import yaml

from memtrans.cli import main as cli_main
from memtrans.eval import evaluate
from memtrans.train import train

from _train_helpers import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    run = tmp / "run"
    train(tiny_config(tmp, steps=6), run, quiet=True)
    return run


def test_eval_writes_metrics_plots(run):
    r = evaluate(run, "test", quiet=True)
    data = json.loads((run / "eval.json").read_text())
    for key in ("split", "loss", "ppl", "bpb", "acc", "tokens", "tokens_per_s", "by_position", "recall", "diagnostics"):
        assert key in data
    assert data["split"] == "test" and data["tokens"] > 0 and data["ppl"] > 1
    assert [b["bucket"] for b in data["by_position"]] == ["0-32", "32-64", "64+"]
    assert sum(b["tokens"] for b in data["by_position"]) == data["tokens"]
    assert data["bpb"] == pytest.approx(data["loss"] / 0.6931471805599453)  # byte tokenizer: 1 byte per token
    rc = data["recall"]
    assert rc["chance"] == pytest.approx(0.1) and rc["tokens"] > 0 and 0 <= rc["acc"] <= 1
    assert sum(b["tokens"] for b in rc["by_distance"]) == rc["tokens"]
    # "far" is beyond the model's local reach (memtrans.model.reach): segment 16 x (depth 2 + 1) - 1 = 47 tokens
    assert rc["local_reach"] == 47 and rc["far_min_distance"] == 49 and 0 < rc["far_tokens"] <= rc["tokens"]
    d = data["diagnostics"]
    assert len(d["gates"]["1"]) == 2 and 0 <= d["memory_share"]["1"] <= 1
    assert len(d["retrieval_distance"]["1"]["counts"]) == len(d["retrieval_distance"]["1"]["edges"]) == 26
    assert sum(d["retrieval_distance"]["1"]["counts"]) > 0
    for name in ("by_position.png", "memory_gates.png", "retrieval_distance.png", "recall_by_distance.png"):
        assert (run / "plots" / name).stat().st_size > 1000
    # another split goes to eval-<split>.json; caps apply
    v = evaluate(run, "val", ["eval.max_docs=1", "eval.max_tokens_per_doc=40"], quiet=True, plots=False)
    assert (run / "eval-val.json").is_file() and v["docs"] == 1 and v["tokens"] == 39
    assert json.loads((run / "eval.json").read_text())["split"] == "test"


def test_eval_is_deterministic_and_batch_independent(run):
    a = evaluate(run, "test", ["eval.batch_size=1"], quiet=True, plots=False)
    b = evaluate(run, "test", ["eval.batch_size=3"], quiet=True, plots=False)
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_cli_eval_prints_table(run, capsys):
    assert cli_main(["eval", str(run), "--split", "test", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "recall acc" in out and "memory layer 1" in out


def _cli_error(args, capsys):
    assert cli_main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(run, tmp_path, capsys):
    assert "does not exist" in _cli_error([str(tmp_path / "missing")], capsys)
    assert "config.yaml" in _cli_error([str(tmp_path)], capsys)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "latest.pt").write_bytes(b"garbage")
    assert "corrupt" in _cli_error([str(broken)], capsys)
    assert (broken / "checkpoints" / "latest.pt").read_bytes() == b"garbage"  # nothing deleted
    mismatch = tmp_path / "mismatch"
    shutil.copytree(run, mismatch)
    cfg = yaml.safe_load((mismatch / "config.yaml").read_text())
    cfg["model"]["gate"] = "fixed"
    (mismatch / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert "does not match the checkpoint" in _cli_error([str(mismatch)], capsys)
    assert "split" in _cli_error([str(run), "--split", "nope"], capsys)
    assert "only eval" in _cli_error([str(run), "--set", "model.dim=8"], capsys)
    nock = tmp_path / "nock"
    nock.mkdir()
    shutil.copy(run / "config.yaml", nock / "config.yaml")
    assert "no checkpoint" in _cli_error([str(nock)], capsys)


def test_empty_split_and_short_documents(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(("hello world %d " % i) * 8)
    cfg = tiny_config(tmp_path, memory=True, steps=2,
                      data={"corpus": f"textdir:{corpus}", "test_fraction": 0.0, "val_fraction": 0.3})
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    assert "empty" in _cli_error([str(run), "--split", "test"], capsys)
    # documents shorter than one segment are evaluated as a partial segment
    r = evaluate(run, "val", ["eval.max_tokens_per_doc=5"], quiet=True, plots=False)
    assert r["tokens"] == 4 * r["docs"] and r["docs"] >= 1


def test_undecodable_text_is_replaced_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_bytes(b"caf\xe9 \xff\xfe bytes " * 10 + bytes([65 + i]) * 20)
    cfg = tiny_config(tmp_path, memory=False, steps=2,
                      data={"corpus": f"textdir:{corpus}", "test_fraction": 0.3, "val_fraction": 0.2})
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    r = evaluate(run, "test", quiet=True, plots=False)
    assert r["data"]["decode_errors"] > 0 and r["tokens"] > 0 and r["recall"] is None


def test_eval_copies_only_per_token_results_to_the_host(run):
    """Loss and accuracy are computed where the logits are; no [B, T, vocab] tensor is copied to the host."""
    import torch
    from torch.overrides import TorchFunctionMode

    copies = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            t = args[0] if args else None
            if (func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.to)
                    and isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == 256):
                copies.append((func.__name__, tuple(t.shape)))
            return func(*args, **(kwargs or {}))

    with Spy():
        r = evaluate(run, "test", quiet=True, plots=False)
    assert r["tokens"] > 0 and copies == []
