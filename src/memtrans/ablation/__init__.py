"""Ablation harness: plan files (plan), running them (runner) and the report (report, plots).

`memtrans ablate PLAN --preset NAME` and `memtrans report OUT_DIR` are the entry points.
"""
