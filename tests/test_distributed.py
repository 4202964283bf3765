"""Two CPU processes under torchrun (gloo): parameters must stay bit-identical across ranks."""
import json
import os
import subprocess
import sys

import torch
import yaml

from _train_helpers import tiny_dict


def test_torchrun_two_processes_keep_params_identical(tmp_path):
    cfg = tiny_dict(tmp_path, memory=True, steps=6)
    cfg["train"]["checkpoint_every"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "memtrans", "train", "--config", str(tmp_path / "c.yaml"), "--run-dir", str(run), "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["steps"] == 6
    sums = summary["rank_param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    ck = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["ranks"]) == 2
    # each rank read its own documents (index % 2 == rank) in its own slots
    assert ck["ranks"][0]["stream"]["rank"] == 0 and ck["ranks"][1]["stream"]["rank"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # rank 0 alone writes: no duplicate lines
    # tokens count both ranks: 2 ranks x 2 slots x 16 positions per step at most
    assert rows[0]["tokens"] <= 64 and rows[-1]["tokens"] > 2 * 32
