"""Generation on the recall task: does `model.generate` write the bound value for queries beyond segment + XL cache?

    python benchmarks/generate_recall.py RUN_DIR [RUN_DIR ...] [--split test] [--write-prompt FILE]

For each held-out document of the run's recall corpus and each far query (its value lies >= 2 x segment_len
tokens after its binding, out of reach of segment + XL cache), the document up to and including the query's
key letter is the prompt, and one token is generated greedily (`model.generate(..., temperature=0)`; the
prompt is streamed segment by segment as in training). Prints per run the share of far queries whose value
was generated right, next to chance. `--write-prompt FILE` writes the first document's first far-query
prompt (for `memtrans generate RUN --prompt-file FILE --show-retrievals`).

The runs come from the recall recipe (configs/recall_proof/, README "Results so far"):
    memtrans train --config configs/recall_proof/local.yaml --run-dir runs/rp-local
    memtrans train --config configs/recall_proof/far.yaml --init-from runs/rp-local --run-dir runs/rp-mem
    memtrans train --config configs/recall_proof/far.yaml --init-from runs/rp-local --run-dir runs/rp-nomem \\
        --set 'model.memory_layers=[]'
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def far_queries(run_dir: str, split: str):
    """(model, tokenizer, [(tokens, [query positions])], chance) of a recall run."""
    from memtrans.data import prepare_data
    from memtrans.generate import load_model

    model, tok, cfg, _ = load_model(run_dir)
    if cfg.data.corpus != "recall":
        raise SystemExit(f"{run_dir}: data.corpus is {cfg.data.corpus!r}, not recall")
    bundle = prepare_data(cfg.data, cfg.train.seed)
    docs = bundle.splits[split]
    far = 2 * cfg.model.segment_len
    out = [(docs.tokens(i).astype(np.int64), np.nonzero(docs.tags(i) >= far)[0]) for i in range(len(docs))]
    info = bundle.info
    chance = info.get("chance", (info.get("recall") or {}).get("chance"))
    return model, tok, out, chance


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="test")
    ap.add_argument("--write-prompt", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| run | memory layers | far queries | generated right | chance | s |\n|---|---|---|---|---|---|")
    for run in a.runs:
        t = time.time()
        model, tok, docs, chance = far_queries(run, a.split)
        right = total = 0
        for tokens, queries in docs:
            for p in queries:
                prompt = torch.as_tensor(tokens[:p + 1])[None]
                new, _ = model.generate(prompt, None, 1, temperature=0)
                right += int(new[0, 0]) == int(tokens[p + 1])
                total += 1
        if a.write_prompt and total:
            tokens, queries = next((d for d in docs if len(d[1])))
            open(a.write_prompt, "wb").write(bytes(tokens[:queries[0] + 1].astype(np.uint8)))
            a.write_prompt = None
        layers = list(model.cfg.memory_layers) or "none"
        print(f"| {run} | {layers} | {total} | {right / max(total, 1):.3f} ({right}) | {chance:.3f} | "
              f"{time.time() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
