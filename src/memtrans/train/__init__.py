"""Training loop, checkpoints, stability tracking, schedules and data-parallel helpers."""
from memtrans.train.trainer import train

__all__ = ["train"]
