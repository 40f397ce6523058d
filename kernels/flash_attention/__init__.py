"""Flash attention (softmax attention with log-sum-exp, GQA, bottom-right causal): Triton kernels and reference."""
from lctrain.kernels.flash_attention.naive import naive_attention
from lctrain.kernels.flash_attention.triton import flash_attention, flash_attention_backward

__all__ = ["flash_attention", "flash_attention_backward", "naive_attention"]
