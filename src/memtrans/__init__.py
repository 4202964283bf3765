"""memtrans: Memorizing Transformers (Wu et al., ICLR 2022) in PyTorch, with an ablation harness.

    from memtrans import ModelConfig, MemorizingTransformer
"""
from memtrans.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, load_config

__all__ = ["Config", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config",
           "MemorizingTransformer", "ModelState"]
__version__ = "0.1.0"


def __getattr__(name):  # the model imports lazily, so data tools and the report never pay for it
    if name in ("MemorizingTransformer", "ModelState"):
        from memtrans import model

        return getattr(model, name)
    raise AttributeError(f"module 'memtrans' has no attribute {name!r}")
