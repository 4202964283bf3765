"""`memtrans generate RUN_DIR --prompt-file FILE`: read a document with the run's model, then write.

The prompt is streamed through the model segment by segment exactly as in training (memory written after each
segment's retrieval, XL cache carried), then tokens are sampled one at a time (`MemorizingTransformer.generate`:
the logits are those of one teacher-forced forward over prompt + continuation). The continuation goes to
stdout. `--show-retrievals` prints, for each generated token and memory layer, the memory share of the head
outputs, the gate, and the entries the memory attended to most (their token position in the document, i.e. in
the prompt or earlier generated text, and a few characters around them), weights averaged over heads.

Bad input (missing run, empty prompt, a prompt file that is not UTF-8 text or that the tokenizer encodes to ids
outside the model's vocabulary) raises ValueError, which `memtrans` prints as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def load_model(run_dir: str | Path):
    """(model in eval mode, tokenizer, resolved config, device) of a training run directory."""
    from memtrans.device import resolve_config, resolve_device
    from memtrans.eval.evaluate import _load_run
    from memtrans.model import MemorizingTransformer

    run_dir = Path(run_dir)
    cfg, ckpt = _load_run(run_dir, None)  # missing run / config / checkpoint, mismatching config: ValueError
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    device = resolve_device(cfg.train.device)
    cfg = resolve_config(cfg, device)
    tokenizer = load_tokenizer(cfg)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the run's model.vocab_size is "
                         f"{cfg.model.vocab_size}: the data config no longer matches the run")
    model = MemorizingTransformer(cfg.model).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's weights do not fit the run's config ({str(e).splitlines()[0][:300]})") from None
    return model.eval(), tokenizer, cfg, device


def load_tokenizer(cfg):
    """The run's tokenizer: byte-level directly; BPE as prepare_data trains (and caches) it for the run's data."""
    if cfg.data.tokenizer == "byte":
        from memtrans.data.tokenizer import ByteTokenizer
        return ByteTokenizer()
    from memtrans.data import prepare_data
    return prepare_data(cfg.data, cfg.train.seed).tokenizer


def read_prompt(path: str | Path, tokenizer, vocab_size: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {p} {'is a directory' if p.is_dir() else 'does not exist'}")
    raw = p.read_bytes()
    if not raw:
        raise ValueError(f"prompt file {p} is empty: give the model some text to read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {p}: byte 0x{raw[e.start]:02x} at offset {e.start} is not valid UTF-8; "
                         f"the {tokenizer.name} tokenizer encodes UTF-8 text") from None
    try:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    except Exception as e:  # a tokenizer that refuses the text
        raise ValueError(f"prompt file {p}: the {tokenizer.name} tokenizer cannot encode it ({e})") from None
    if ids.size == 0:
        raise ValueError(f"prompt file {p} encodes to no tokens")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"prompt file {p}: the tokenizer produced id {int(ids.max())}, outside the model's "
                         f"vocabulary of {vocab_size}")
    return ids


def _snippet(tokenizer, ids: np.ndarray, pos: int, width: int) -> str:
    """A few characters around document position pos, in brackets the character the entry's token ends
    (with byte tokens, a multi-byte character is shown whole at its last byte)."""
    lo, hi = max(0, pos - width), min(len(ids), pos + width + 1)
    dec = lambda a: tokenizer.decode(a).replace("\n", "⏎").replace("\t", "⇥").replace("\ufffd", "·")
    upto = dec(ids[lo:pos + 1])
    return f"{upto[:-1]}[{upto[-1:]}]{dec(ids[pos + 1:hi])}"


def entry_weights(r: dict, row: int = 0) -> list[tuple[int, float]]:
    """One memory layer's retrieval record (see MemorizingTransformer.generate) for batch row `row`:
    [(document position, weight)], the weight of each retrieved position averaged over heads (each head's
    memory weights sum to 1, so the weights sum to 1 over a non-empty memory), heaviest first."""
    pos, w = r["positions"][row].cpu(), r["weights"][row].float().cpu()  # [H, k]
    H = pos.shape[0]
    per_pos: dict[int, float] = {}
    for p_, w_ in zip(pos.flatten().tolist(), w.flatten().tolist()):
        if p_ >= 0:  # -1: no entry (memory not full enough for k)
            per_pos[p_] = per_pos.get(p_, 0.0) + w_ / H
    return sorted(per_pos.items(), key=lambda t: (-t[1], t[0]))


def format_retrievals(record: dict, tokenizer, ids: np.ndarray, top: int = 3, width: int = 8) -> list[str]:
    """Lines describing one generated token's retrievals (batch row 0), one per memory layer."""
    lines = []
    for layer, r in sorted(record.items()):
        share = r["share"][0].float().cpu()  # [H]
        best = entry_weights(r)[:top]
        gate = "" if r["gate"] is None else f", gate {' '.join(f'{g:.2f}' for g in r['gate'].tolist())}"
        head = f"    layer {layer}: memory share {share.mean():.2f} (heads {' '.join(f'{s:.2f}' for s in share.tolist())}){gate}"
        if not best:
            lines.append(head + "; memory empty")
            continue
        lines.append(head + "; top entries:")
        for p_, w_ in best:
            lines.append(f"      @{p_:<7d} w {w_:.2f}  {_snippet(tokenizer, ids, p_, width)!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="memtrans generate",
                                 description="Stream a prompt through a run's model (memory and XL cache as in "
                                             "training), then sample a continuation.")
    ap.add_argument("run_dir")
    ap.add_argument("--prompt-file", required=True, help="UTF-8 text the model reads first")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    ap.add_argument("--show-retrievals", action="store_true",
                    help="per generated token: memory share, gate and the top retrieved entries of each memory layer")
    ap.add_argument("--top-entries", type=int, default=3, help="entries shown per token with --show-retrievals")
    ap.add_argument("--context", type=int, default=8, help="characters of context shown on each side of an entry")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_entries < 1 or args.context < 0:
        raise ValueError(f"--top-entries must be >= 1 and --context >= 0, got {args.top_entries} and {args.context}")
    from memtrans.device import autocast_context
    from memtrans.model.transformer import check_sampling
    check_sampling(args.temperature, args.top_k, args.top_p)

    model, tokenizer, cfg, device = load_model(args.run_dir)
    ids = read_prompt(args.prompt_file, tokenizer, cfg.model.vocab_size)
    prompt = torch.as_tensor(ids, dtype=torch.long, device=device)[None]
    generator = torch.Generator().manual_seed(args.seed)
    retrievals = [] if args.show_retrievals and model.cfg.has_memory else None
    from tqdm import tqdm
    bar = tqdm(total=len(ids), desc="reading prompt", unit="tok", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())
    with autocast_context(cfg.train.precision, device):
        new, _ = model.generate(prompt, model.init_state(1), args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, generator=generator, retrievals=retrievals,
                                progress=bar.update)
    bar.close()
    new_ids = new[0].cpu().numpy()
    if args.show_retrievals:
        if not model.cfg.has_memory:
            print("memtrans generate: this model has no memory layers; no retrievals to show")
        else:
            tail = tokenizer.decode(ids[-40:]).replace("\n", "⏎").replace("\ufffd", "·")
            print(f"memtrans generate: {len(ids)} prompt tokens, ending {tail!r}; per generated token, what the "
                  f"memory retrieved (@ = token position in the document, [x] = the entry's token)")
        everything = np.concatenate([ids, new_ids])
        for j, tok in enumerate(new_ids):
            print(f"  token {j} (position {len(ids) + j}): {tokenizer.decode(new_ids[j:j + 1])!r}")
            if retrievals is not None:
                for line in format_retrievals(retrievals[j], tokenizer, everything[:len(ids) + j],
                                              args.top_entries, args.context):
                    print(line)
        print("continuation:")
    print(tokenizer.decode(new_ids), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
