"""Lightning attention (causal linear attention with per-head decay): Triton kernels and their reference."""
from lctrain.kernels.lightning_attention.chunk import lightning_attention
from lctrain.kernels.lightning_attention.naive import naive_lightning_attention

__all__ = ["lightning_attention", "naive_lightning_attention"]
