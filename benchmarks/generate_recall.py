"""Generation on the recall task: does `model.generate` write the bound value for queries beyond segment + XL cache?

    python benchmarks/generate_recall.py [--seeds 0,1,2,3,4] [--out DIR] [--write-prompt FILE]
    python benchmarks/generate_recall.py --runs RUN_DIR [RUN_DIR ...]

Per seed, the recall recipe of benchmarks/recall_proof.py (configs/recall_proof/: a one-layer model pretrained
without memory on short documents, then fine-tuned with a kNN memory / without on documents whose queries
lie >= 100 tokens after their bindings) trains three runs (~25 s), then for each held-out document and each
far query (beyond the model's local reach, `memtrans.model.reach.far_distance`, as `memtrans eval` counts)
the document up to and including the query's key letter is the prompt, and one token is generated greedily
(`model.generate(..., temperature=0)`; the prompt is streamed segment by segment as in training). The table
gives the share of far queries whose value was generated right, with and without memory; for the memory
model the share whose heaviest retrieved entry (weight averaged over heads) is the query's binding token;
and the teacher-forced far recall of `memtrans eval` (greedy generation must equal it: same argmax at the
same positions). `--runs` measures existing runs instead of training. `--write-prompt FILE` writes the
memory run's first far-query prompt that it answers right, for
`memtrans generate RUN --prompt-file FILE --max-new-tokens 1 --temperature 0 --show-retrievals`.
Tests: tests/test_generate_recall.py (seed 0).

The same runs by hand:
    memtrans train --config configs/recall_proof/local.yaml --run-dir runs/rp-local
    memtrans train --config configs/recall_proof/far.yaml --init-from runs/rp-local --run-dir runs/rp-mem
    memtrans train --config configs/recall_proof/far.yaml --init-from runs/rp-local --run-dir runs/rp-nomem \\
        --set 'model.memory_layers=[]'
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@torch.no_grad()
def far_generation(run_dir) -> dict:
    """Greedy one-token generation at every far query of the run's test split."""
    from memtrans.data import prepare_data
    from memtrans.generate import entry_weights, load_model
    from memtrans.model.reach import far_distance

    model, _, cfg, _ = load_model(run_dir)
    if cfg.data.corpus != "recall":
        raise SystemExit(f"{run_dir}: data.corpus is {cfg.data.corpus!r}, not recall")
    bundle = prepare_data(cfg.data, cfg.train.seed)
    docs = bundle.splits["test"]
    far = far_distance(cfg.model.segment_len, cfg.model.depth, cfg.model.xl_cache)
    right = on_binding = total = 0
    example = None
    for i in range(len(docs)):
        tokens, tags = docs.tokens(i).astype(np.int64), docs.tags(i)
        for p in np.nonzero(tags >= far)[0]:  # tags[p]: distance from the value token p + 1 to its binding
            records = [] if model.cfg.has_memory else None
            new, _ = model.generate(torch.as_tensor(tokens[:p + 1])[None], None, 1, temperature=0, retrievals=records)
            ok = int(new[0, 0]) == int(tokens[p + 1])
            right += ok
            total += 1
            if records:
                hit = entry_weights(records[0][0])[0][0] == p + 1 - tags[p]
                on_binding += hit
                if example is None and ok and hit:
                    example = tokens[:p + 1]
    return {"queries": total, "right": right / max(total, 1),
            "on_binding": on_binding / max(total, 1) if model.cfg.has_memory else None,
            "memory": model.cfg.has_memory, "chance": bundle.info["chance"], "example": example}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", help="keep the trained runs here (default: a temporary directory)")
    ap.add_argument("--runs", nargs="+", help="measure these recall runs instead of training")
    ap.add_argument("--write-prompt", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from common import header
    print(header("generate_recall: far-query values generated greedily, with and without memory"))
    if a.runs:
        print("| run | far queries | generated right | top entry = binding | chance | s |\n|---|---|---|---|---|---|")
        for run in a.runs:
            t = time.time()
            g = far_generation(run)
            bind = "-" if g["on_binding"] is None else f"{g['on_binding']:.3f}"
            print(f"| {run} | {g['queries']} | {g['right']:.3f} | {bind} |"
                  f" {g['chance']:.3f} | {time.time() - t:.0f} |", flush=True)
            if a.write_prompt and g["example"] is not None:
                Path(a.write_prompt).write_bytes(bytes(g["example"].astype(np.uint8)))
                a.write_prompt = None
        return

    from recall_proof import mean_std, run_seed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.out or tmp)
        print("| seed | far queries | generated right, memory | top entry = binding | generated right, no memory |"
              " eval far recall, memory / no memory | train + generate s |\n|---|---|---|---|---|---|---|")
        for seed in (int(s) for s in a.seeds.split(",")):
            t = time.time()
            r = run_seed(base / f"seed{seed}", seed)  # trains local, memory, no_memory and evaluates them
            mem, nomem = far_generation(base / f"seed{seed}" / "memory"), far_generation(base / f"seed{seed}" / "no_memory")
            rows.append({"mem": mem["right"], "bind": mem["on_binding"], "nomem": nomem["right"]})
            print(f"| {seed} | {mem['queries']} | {mem['right']:.3f} | {mem['on_binding']:.3f} | {nomem['right']:.3f} |"
                  f" {r['memory']:.3f} / {r['no_memory']:.3f} | {time.time() - t:.0f} |", flush=True)
            if a.write_prompt and mem["example"] is not None:
                Path(a.write_prompt).write_bytes(bytes(mem["example"].astype(np.uint8)))
                a.write_prompt = None
    if len(rows) > 1:
        stat = lambda k: mean_std([r[k] for r in rows])
        print(f"| mean ± std | | **{stat('mem')}** | {stat('bind')} | {stat('nomem')} | | |")
    print(f"chance {mem['chance']:.3f}")


if __name__ == "__main__":
    main()
