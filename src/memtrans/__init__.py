"""memtrans: Memorizing Transformers (Wu et al., ICLR 2022) in PyTorch, with an ablation harness."""
from memtrans.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from memtrans.model import MemorizingTransformer, ModelState

__all__ = ["Config", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_config",
           "MemorizingTransformer", "ModelState"]
__version__ = "0.1.0"
