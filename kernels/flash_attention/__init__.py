"""Flash attention (softmax attention with log-sum-exp, GQA, bottom-right causal): Triton kernels and reference.

Importing this package registers the kernels as the "triton" backend of `lctrain.ops.attention`: picked
automatically for CUDA tensors once validated on a GPU (see lctrain.ops.registry); forced by name, it also
runs on CPU tensors under TRITON_INTERPRET=1.
"""
from lctrain.kernels.flash_attention.naive import naive_attention
from lctrain.kernels.flash_attention.triton import flash_attention, flash_attention_backward, flash_attention_forward
from lctrain.kernels.utils import SUPPORTED_DTYPES
from lctrain.ops.attention import register_attention_backend
from lctrain.ops.registry import is_gpu_tensor


def _supports(q, k, v, causal) -> bool:
    return is_gpu_tensor(q) and q.dtype in SUPPORTED_DTYPES and q.shape[-1] <= 256


# No claim: on a GPU it ranks below flash-attn and SDPA until make gpu-check records a passing run there.
register_attention_backend("triton", flash_attention_forward, flash_attention_backward, _supports, priority=30,
                           validated_on_gpu=False)

__all__ = ["flash_attention", "flash_attention_backward", "flash_attention_forward", "naive_attention"]
