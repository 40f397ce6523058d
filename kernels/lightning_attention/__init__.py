"""Lightning attention (causal linear attention with per-head decay): Triton kernels and their reference.

Importing this package registers the kernels as the "triton" backend of `lctrain.ops.linear_attention`:
picked automatically for CUDA tensors once validated on a GPU (see lctrain.ops.registry); forced by name, it
also runs on CPU tensors under TRITON_INTERPRET=1.
"""
from lctrain.kernels.lightning_attention.chunk import lightning_attention
from lctrain.kernels.lightning_attention.naive import naive_lightning_attention
from lctrain.kernels.utils import SUPPORTED_DTYPES
from lctrain.ops.linear_attention import register_linear_attention_backend
from lctrain.ops.registry import is_gpu_tensor


def _supports(q, k, v, log_decay) -> bool:
    return is_gpu_tensor(q) and q.dtype in SUPPORTED_DTYPES and max(q.shape[-1], v.shape[-1]) <= 256


# No claim: on a GPU the PyTorch "chunk" backend ranks above it until make gpu-check records a passing run.
register_linear_attention_backend("triton", lightning_attention, supports=_supports, priority=100,
                                  validated_on_gpu=False)

__all__ = ["lightning_attention", "naive_lightning_attention"]
