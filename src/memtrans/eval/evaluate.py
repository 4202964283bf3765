"""Evaluation: `memtrans eval RUN_DIR [--split test] [--set eval.key=value ...]`.

Whole held-out documents stream through the model exactly as in training (B slots, one segment per
step, XL cache and memory accumulating within each document and reset between documents), under
torch.no_grad and, if the run trained with bf16, bf16 autocast. Reported (RUN/eval.json for the test
split, RUN/eval-<split>.json for others; plots in RUN/plots/):

- loss (nats/token), perplexity, bits per byte (nll in bits / UTF-8 bytes of the target tokens), next-token
  accuracy, overall and by position of the TARGET token in its document (EvalConfig.position_buckets);
- recall corpora: accuracy on scored value tokens (tags >= 0) overall, by distance (log2 buckets), and
  beyond the model's local reach ("far": distance >= `memtrans.model.reach.far_distance`, i.e. more than
  segment_len x (depth + 1) tokens with the XL cache, which no path through the segment, the cache and the
  layers spans without memory), with the chance level from the data bundle;
- memory diagnostics per memory layer: gate per head, share of output from memory, retrieval distances.

Edge cases: documents shorter than one segment are evaluated as one partial segment; documents with
fewer than 2 tokens (nothing to predict) are skipped and counted; text that is not valid UTF-8 was
already decoded with replacement characters by the data layer (counted in `data.decode_errors`).
Missing run directory / config / checkpoint, a corrupt checkpoint, a config that does not match the
checkpoint or an empty split raise ValueError (the CLI prints one line and exits 2). Nothing is deleted.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memtrans.config import Config, load_config
from memtrans.utils import atomic_write_json

ALLOWED_OVERRIDES = ("eval.", "train.device", "train.threads")


def bucket_label(lo: int, hi: int | None) -> str:
    def fmt(n: int) -> str:
        if n >= 1024 and n % 1024 == 0:
            return f"{n // 1024}K"
        return str(n)
    return f"{fmt(lo)}+" if hi is None else f"{fmt(lo)}-{fmt(hi)}"


def eval_file(run_dir: Path, split: str) -> Path:
    return run_dir / ("eval.json" if split == "test" else f"eval-{split}.json")


def _cap_docs(docs, max_docs: int | None, max_tokens: int | None):
    """A TokenizedDocs limited to the first `max_docs` documents and `max_tokens` tokens each."""
    from memtrans.data import TokenizedDocs

    if max_docs is None and max_tokens is None:
        return docs
    n = len(docs) if max_docs is None else min(len(docs), max_docs)
    arrays, tags, nbytes = [], [], []
    for i in range(n):
        t = np.asarray(docs.tokens(i))
        arrays.append(t[:max_tokens] if max_tokens else t)
        tg = docs.tags(i)
        if tg is not None:
            tags.append(np.asarray(tg)[:len(arrays[-1])])
    out = TokenizedDocs.from_arrays(arrays, docs.ids[:n], tags if docs.has_tags else None)
    return out


class Accumulator:
    """Sums of nll, bytes, correct predictions and tokens per position bucket."""

    def __init__(self, n: int):
        self.nll = np.zeros(n)
        self.bytes = np.zeros(n)
        self.correct = np.zeros(n)
        self.tokens = np.zeros(n)

    def add(self, bucket: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor, correct: torch.Tensor) -> None:
        n = len(self.tokens)
        self.nll += torch.bincount(bucket, weights=nll.double(), minlength=n).numpy()[:n]
        self.bytes += torch.bincount(bucket, weights=nbytes.double(), minlength=n).numpy()[:n]
        self.correct += torch.bincount(bucket, weights=correct.double(), minlength=n).numpy()[:n]
        self.tokens += torch.bincount(bucket, minlength=n).numpy()[:n]

    @staticmethod
    def metrics(nll: float, nbytes: float, correct: float, tokens: float) -> dict:
        if tokens == 0:
            return {"loss": None, "ppl": None, "bpb": None, "acc": None, "tokens": 0}
        loss = nll / tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nll / math.log(2) / max(nbytes, 1),
                "acc": correct / tokens, "tokens": int(tokens)}


def check_overrides(overrides: list[str] | None) -> None:
    for o in overrides or []:
        key = o.split("=", 1)[0].strip()
        if not key.startswith(ALLOWED_OVERRIDES):
            raise ValueError(f"eval --set {key}: only eval.* (and train.device, train.threads) may be overridden "
                             f"at evaluation time")


def _load_run(run_dir: Path, overrides: list[str] | None):
    from memtrans.train.checkpoint import checkpoint_path, load_checkpoint

    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    check_overrides(overrides)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} has no config.yaml (not a training run directory?)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    ckpt_file = checkpoint_path(run_dir)
    if not ckpt_file.is_file():
        raise ValueError(f"{run_dir} has no checkpoint ({ckpt_file}); train it first")
    ckpt = load_checkpoint(ckpt_file)
    if "model" not in ckpt:
        raise ValueError(f"checkpoint {ckpt_file} holds no model weights")
    saved_model = (ckpt.get("config") or {}).get("model")
    if saved_model is not None:
        from memtrans.train.trainer import config_differences
        diff = config_differences(saved_model, cfg.to_dict()["model"])
        if diff:
            raise ValueError(f"{run_dir}/config.yaml does not match the checkpoint: model.{', model.'.join(diff)} differ")
    return cfg, ckpt


def evaluate(run_dir: str | Path, split: str = "test", overrides: list[str] | None = None, quiet: bool = False,
             plots: bool = True) -> dict:
    """Evaluate the run's checkpoint on `split`; writes eval(-split).json and plots; returns the result dict."""
    from memtrans.data import DocumentStream, prepare_data
    from memtrans.model import MemorizingTransformer
    from memtrans.model.attention import DISTANCE_EDGES
    from memtrans.model.reach import of_model as reach_of
    from memtrans.device import autocast_context, policy_of, resolve_config, resolve_device

    run_dir = Path(run_dir)
    cfg, ckpt = _load_run(run_dir, overrides)
    ec = cfg.eval
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    device = resolve_device(cfg.train.device)
    cfg = resolve_config(cfg, device)  # a run's config.yaml is resolved already; a hand-made one may say auto
    if not quiet:
        print(f"memtrans eval: {policy_of(cfg, device).describe()}", flush=True)
    bundle = prepare_data(cfg.data, cfg.train.seed)
    if split not in bundle.splits:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(bundle.splits)}")
    if bundle.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {bundle.vocab_size} tokens but the run's model.vocab_size is "
                         f"{cfg.model.vocab_size}: the data config no longer matches the run")
    docs = _cap_docs(bundle.splits[split], ec.max_docs, ec.max_tokens_per_doc)
    if len(docs) == 0 or docs.num_tokens == 0:
        raise ValueError(f"split {split!r} of corpus {cfg.data.corpus!r} is empty (no documents to evaluate)")
    lengths = np.asarray([len(docs.tokens(i)) for i in range(len(docs))])
    skipped = int((lengths < 2).sum())
    if skipped == len(docs):
        raise ValueError(f"split {split!r}: every document has fewer than 2 tokens; nothing to predict")

    model = MemorizingTransformer(cfg.model).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's weights do not fit the run's config ({str(e).splitlines()[0][:300]})") from None
    model.eval()
    T = cfg.model.segment_len
    B = max(1, min(ec.batch_size, len(docs)))  # slots beyond the number of documents would only compute padding
    stream = DocumentStream(docs, B, T, seed=0, loop=False, shuffle=False)
    state = model.init_state(B)
    amp = autocast_context(cfg.train.precision, device)
    edges = [int(e) for e in ec.position_buckets]
    if any(b <= a for a, b in zip(edges, edges[1:])) or any(e <= 0 for e in edges):
        raise ValueError(f"eval.position_buckets must be increasing positive integers, got {edges}")
    edges_t = torch.tensor(edges, dtype=torch.long)
    acc = Accumulator(len(edges) + 1)
    token_bytes = torch.as_tensor(np.asarray(bundle.token_bytes), dtype=torch.float64)
    rec_edges = [0] + [2 ** i for i in range(25)]
    rec_correct, rec_tokens = np.zeros(len(rec_edges)), np.zeros(len(rec_edges))
    reach = reach_of(cfg.model)
    far_correct = far_tokens = 0
    diag_share: dict[int, np.ndarray] = {}
    diag_queries: dict[int, float] = {}
    diag_gate: dict[int, list | None] = {}
    diag_dist: dict[int, np.ndarray] = {}
    start = time.time()
    with torch.no_grad():
        for batch in stream:
            model.reset_state(state, batch.new_doc)
            diag: dict = {} if model.cfg.has_memory else None
            with amp:
                logits, state = model(batch.tokens.to(device), state, diagnostics=diag)
            # loss and accuracy on the device; only the per-token results [B, T] come to the host
            targets = batch.targets.to(device)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            nll = nll.view(targets.shape).double().cpu()
            correct = (logits.argmax(-1) == targets).cpu()
            mask = batch.loss_mask
            pos = batch.positions[:, None] + torch.arange(targets.shape[1])[None, :] + 1  # target positions
            bucket = torch.bucketize(pos, edges_t, right=True)
            acc.add(bucket[mask], nll[mask], token_bytes[batch.targets[mask]], correct[mask])
            scored = mask & (batch.tags >= 0)
            if scored.any():
                dist = batch.tags[scored]
                c = correct[scored]
                rb = torch.bucketize(dist, torch.tensor(rec_edges), right=True) - 1
                rec_correct += torch.bincount(rb, weights=c.double(), minlength=len(rec_edges)).numpy()[:len(rec_edges)]
                rec_tokens += torch.bincount(rb, minlength=len(rec_edges)).numpy()[:len(rec_edges)]
                far = dist >= reach["far_distance"]
                far_correct += int(c[far].sum())
                far_tokens += int(far.sum())
            for layer, d in (diag or {}).items():
                if not d:
                    continue
                q = float(d["queries_with_memory"])
                share = d["memory_share"].double().numpy()
                diag_share[layer] = diag_share.get(layer, 0) + share * q
                diag_queries[layer] = diag_queries.get(layer, 0.0) + q
                diag_gate[layer] = None if d["gate"] is None else d["gate"].tolist()
                diag_dist[layer] = diag_dist.get(layer, 0) + d["distance_counts"].double().numpy()
    elapsed = time.time() - start

    total = Accumulator.metrics(acc.nll.sum(), acc.bytes.sum(), acc.correct.sum(), acc.tokens.sum())
    by_position = []
    bounds = [0] + edges
    for i, lo in enumerate(bounds):
        hi = edges[i] if i < len(edges) else None
        m = Accumulator.metrics(acc.nll[i], acc.bytes[i], acc.correct[i], acc.tokens[i])
        by_position.append({"bucket": bucket_label(lo, hi), "lo": lo, "hi": hi, **m})
    recall = None
    if docs.has_tags and rec_tokens.sum() > 0:
        info = bundle.info
        chance = info.get("chance", (info.get("recall") or {}).get("chance"))
        by_distance = [{"lo": rec_edges[i], "hi": rec_edges[i + 1] if i + 1 < len(rec_edges) else None,
                        "acc": rec_correct[i] / rec_tokens[i], "tokens": int(rec_tokens[i])}
                       for i in range(len(rec_edges)) if rec_tokens[i] > 0]
        recall = {"acc": rec_correct.sum() / rec_tokens.sum(), "chance": chance, "tokens": int(rec_tokens.sum()),
                  "by_distance": by_distance, "far_min_distance": reach["far_distance"],
                  "local_reach": reach["reach"],
                  "far_acc": far_correct / far_tokens if far_tokens else None, "far_tokens": far_tokens}
    dist_edges = [int(e) for e in DISTANCE_EDGES]
    diagnostics = {"gates": {str(k): v for k, v in sorted(diag_gate.items())},
                   "memory_share": {str(k): float((diag_share[k] / max(diag_queries[k], 1)).mean())
                                    for k in sorted(diag_share)},
                   "memory_share_per_head": {str(k): (diag_share[k] / max(diag_queries[k], 1)).tolist()
                                             for k in sorted(diag_share)},
                   "retrieval_distance": {str(k): {"edges": dist_edges, "counts": [int(c) for c in diag_dist[k]]}
                                          for k in sorted(diag_dist)}}
    result = {"split": split, **total, "tokens_per_s": total["tokens"] / elapsed if elapsed > 0 else 0.0,
              "wall_time_s": elapsed, "docs": len(docs) - skipped, "skipped_docs": skipped,
              "step": int(ckpt.get("step", 0)), "device": str(device), "by_position": by_position,
              "recall": recall, "diagnostics": diagnostics,
              "data": {"decode_errors": int(bundle.info.get("decode_errors", 0) or 0),
                       "max_docs": ec.max_docs, "max_tokens_per_doc": ec.max_tokens_per_doc}}
    atomic_write_json(eval_file(run_dir, split), result)
    if plots:
        from memtrans.eval.plots import make_plots
        try:
            result_plots = make_plots(result, run_dir / "plots", "" if split == "test" else f"-{split}")
        except Exception as e:  # plots are a convenience; the numbers are already written
            print(f"memtrans eval: plots skipped ({type(e).__name__}: {e})", file=sys.stderr)
            result_plots = []
        result["plots"] = [str(p) for p in result_plots]
    if not quiet:
        print(format_result(result, run_dir))
    return result


def _f(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_result(r: dict, run_dir: Path | str = "") -> str:
    lines = [f"eval {run_dir} [{r['split']}] step {r['step']}: loss {_f(r['loss'])}  ppl {_f(r['ppl'], '.3f')}  "
             f"bpb {_f(r['bpb'])}  acc {_f(r['acc'])}  ({r['tokens']} tokens, {r['docs']} docs, "
             f"{r['tokens_per_s']:.0f} tok/s)"]
    lines.append(f"  {'position':<12}{'tokens':>10}{'ppl':>10}{'bpb':>9}{'acc':>9}")
    for b in r["by_position"]:
        lines.append(f"  {b['bucket']:<12}{b['tokens']:>10}{_f(b['ppl'], '.3f'):>10}{_f(b['bpb']):>9}{_f(b['acc']):>9}")
    if r["recall"]:
        rc = r["recall"]
        lines.append(f"  recall acc {_f(rc['acc'])} (far >= {rc['far_min_distance']}: {_f(rc['far_acc'])}, "
                     f"{rc['far_tokens']} tokens; chance {_f(rc['chance'], '.3f')})")
    for layer, share in r["diagnostics"]["memory_share"].items():
        g = r["diagnostics"]["gates"].get(layer)
        lines.append(f"  memory layer {layer}: share from memory {share:.3f}"
                     + (f", gates {' '.join(f'{x:.2f}' for x in g)}" if g else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memtrans eval", description="Evaluate a run directory on a held-out split.")
    p.add_argument("run_dir")
    p.add_argument("--split", default=None, help="test (default: eval.split) | val | train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="eval.KEY=VALUE")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    split = args.split
    check_overrides(args.overrides)
    if split is None:
        split = load_config(Path(args.run_dir) / "config.yaml", args.overrides).eval.split \
            if (Path(args.run_dir) / "config.yaml").is_file() else "test"
    evaluate(args.run_dir, split, args.overrides, quiet=args.quiet, plots=not args.no_plots)
    return 0
