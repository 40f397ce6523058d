"""Softmax attention through PyTorch's fused SDPA kernels, which also return the log-sum-exp.

CPU: `aten._scaled_dot_product_flash_attention_for_cpu` and its backward. Checked on torch 2.13: it takes
float32/float64/bfloat16/float16, reads GQA natively (query head i uses kv head i // g, dK/dV come back with
kv heads), accepts a float additive mask in forward and backward, and returns lse in float32 (float64 for
float64). Its causal mask is aligned top-left, so bottom-right alignment is adapted here (both devices):
sq > sk: the first sq - sk queries see nothing (o = 0, lse = -inf) and the rest form a square causal
problem; sq < sk: the first sk - sq keys are visible to every query (one non-causal call) and the last sq
keys form a square causal problem (one causal call); the two are merged by log-sum-exp, and the backward
differentiates both with the merged (o, lse). Measured on CPU (512 queries, 4096 keys) this split is about
twice as fast as passing a `[sq, sk]` additive mask, which the op also accepts.

CUDA: `aten._scaled_dot_product_flash_attention` (float16/bfloat16, head dim <= 256 and a multiple of 8) and its
backward, the two halves of the kernel `F.scaled_dot_product_attention` runs. GQA is native (what `enable_gqa=True`
selects): K/V keep their kv heads, no copies, and dK/dV come back with kv heads. The backward starts from the
given (possibly merged) out and lse -- the same inputs flash-attn's backward takes -- so nothing of the forward
is re-run: its other auxiliary outputs are empty for dense inputs (cumulative lengths, None), the lengths
themselves, and the RNG state, which is not read without dropout (placeholders of the forward's shapes). Meta
tensors take this branch when `lctrain.ops.registry.meta_as_gpu` makes them answer as GPU tensors (the
rehearsal; tests/ops/test_attention.py checks there that the backward issues no forward op and no K/V copy).
"""
from __future__ import annotations

import torch

from lctrain.ops.attention_merge import merge_attention
from lctrain.ops.registry import is_gpu_tensor

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether this backend computes the case exactly."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return False
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if is_gpu_tensor(q):
        d = q.shape[3]
        return q.dtype in _CUDA_DTYPES and d <= 256 and d % 8 == 0
    return False


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [b, s, h, d] <-> [b, h, s, d]


def _cpu_forward(q, k, v, causal, scale):
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_t(q), _t(k), _t(v), 0.0, causal,
                                                                          scale=scale)
    return _t(o), lse  # [b, sq, h, d], [b, h, sq]


def _cpu_backward(do, q, k, v, o, lse, causal, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(do), _t(q), _t(k), _t(v), _t(o), lse.to(_lse_dtype(q.dtype)).contiguous(), 0.0, causal, scale=scale)
    return _t(dq), _t(dk), _t(dv)


def _cuda_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(_t(q), _t(k), _t(v), 0.0, causal, False, scale=scale)
    return _t(res[0]), res[1]  # [b, sq, h, d], [b, h, sq] float32


def _cuda_backward(do, q, k, v, o, lse, causal, scale):
    # RNG state placeholders, shaped as the forward returns them (rng_state, unused): not read without dropout.
    rng, unused = (torch.empty(shape, dtype=torch.uint64, device=q.device) for shape in ((2,), ()))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _t(do), _t(q), _t(k), _t(v), _t(o), lse.float().contiguous(), None, None, q.shape[1], k.shape[1], 0.0,
        causal, rng, unused, scale=scale)
    return _t(dq), _t(dk), _t(dv)  # dk, dv with kv heads


def _dense_forward(q, k, v, causal, scale):
    """sq == sk when causal (top-left and bottom-right alignment agree)."""
    if is_gpu_tensor(q):
        return _cuda_forward(q, k, v, causal, scale)
    return _cpu_forward(q, k, v, causal, scale)


def _dense_backward(do, q, k, v, o, lse, causal, scale):
    if is_gpu_tensor(q):
        return _cuda_backward(do, q, k, v, o, lse, causal, scale)
    return _cpu_backward(do, q, k, v, o, lse, causal, scale)


def sdpa_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                           softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `[b, sq, h, d]` and lse `[b, h, sq]` (see :mod:`lctrain.ops.attention`)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if not causal or sq == sk:
        return _dense_forward(q, k, v, causal, softmax_scale)
    if sq > sk:
        cut = sq - sk  # these queries see no key
        o = torch.zeros_like(q)
        lse = torch.full((b, h, sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
        o[:, cut:], lse[:, :, cut:] = _dense_forward(q[:, cut:], k, v, True, softmax_scale)
        return o, lse
    p = sk - sq  # keys every query sees
    o, lse = _dense_forward(q, k[:, :p], v[:, :p], False, softmax_scale)
    o = o.to(_lse_dtype(q.dtype))
    merge_attention(o, lse, *_dense_forward(q, k[:, p:], v[:, p:], True, softmax_scale))
    return o.to(q.dtype), lse


def sdpa_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, causal: bool,
                            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq `[b, sq, h, d]`, dk and dv `[b, sk, h_kv, d]` for the given (possibly merged) o and lse."""
    sq, sk = q.shape[1], k.shape[1]
    if not causal or sq == sk:
        return _dense_backward(do, q, k, v, o, lse, causal, softmax_scale)
    if sq > sk:
        cut = sq - sk
        dq = torch.zeros_like(q)
        dq[:, cut:], dk, dv = _dense_backward(do[:, cut:], q[:, cut:], k, v, o[:, cut:], lse[:, :, cut:], True,
                                              softmax_scale)
        return dq, dk, dv
    p = sk - sq
    dq1, dk1, dv1 = _dense_backward(do, q, k[:, :p], v[:, :p], o, lse, False, softmax_scale)
    dq2, dk2, dv2 = _dense_backward(do, q, k[:, p:], v[:, p:], o, lse, True, softmax_scale)
    acc = _lse_dtype(q.dtype)
    return (dq1.to(acc) + dq2).to(q.dtype), torch.cat([dk1, dk2], dim=1), torch.cat([dv1, dv2], dim=1)
