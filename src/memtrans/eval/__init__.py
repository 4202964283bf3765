"""Evaluation of a run directory: perplexity / bits per byte / accuracy by position, recall, memory diagnostics."""
from memtrans.eval.evaluate import evaluate

__all__ = ["evaluate"]
