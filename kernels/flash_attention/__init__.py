"""Flash attention (softmax attention with log-sum-exp, GQA, bottom-right causal): Triton kernels and reference.

Importing this package registers the kernels as the "triton" backend of `lctrain.ops.attention`: picked
automatically for CUDA tensors (highest priority); forced by name, it also runs on CPU tensors under
TRITON_INTERPRET=1.
"""
from lctrain.kernels.flash_attention.naive import naive_attention
from lctrain.kernels.flash_attention.triton import flash_attention, flash_attention_backward, flash_attention_forward
from lctrain.kernels.utils import SUPPORTED_DTYPES
from lctrain.ops.attention import register_attention_backend


def _supports(q, k, v, causal) -> bool:
    return q.is_cuda and q.dtype in SUPPORTED_DTYPES and q.shape[-1] <= 256


register_attention_backend("triton", flash_attention_forward, flash_attention_backward, _supports, priority=30)

__all__ = ["flash_attention", "flash_attention_backward", "flash_attention_forward", "naive_attention"]
