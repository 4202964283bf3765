"""The Memorizing Transformer model (layers -> attention with memory and gates -> transformer)."""
from memtrans.model.transformer import MemorizingTransformer, ModelState

__all__ = ["MemorizingTransformer", "ModelState"]
