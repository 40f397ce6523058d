"""Softmax attention through PyTorch's fused SDPA kernels, which also return the log-sum-exp.

CPU: `aten._scaled_dot_product_flash_attention_for_cpu` and its backward. Checked on torch 2.13: it takes
float32/float64/bfloat16/float16, reads GQA natively (query head i uses kv head i // g, dK/dV come back with
kv heads), accepts a float additive mask in forward and backward, and returns lse in float32 (float64 for
float64). Its causal mask is aligned top-left, so bottom-right alignment is adapted here:
sq > sk: the first sq - sk queries see nothing (o = 0, lse = -inf) and the rest form a square causal
problem; sq < sk: an additive `[sq, sk]` mask (the op would report lse = 0 for a fully masked row, a case
that bottom-right alignment with sq < sk never produces).

CUDA: `aten._scaled_dot_product_flash_attention` (float16/bfloat16, head dim <= 256, equal heads: kv heads
are repeated and their gradients summed back). Its backward needs the forward's auxiliary outputs, which the
dispatch does not keep, so the backward re-runs the block forward to obtain them and then differentiates
with the given (possibly merged) out and lse. Causal with sq < sk is not supported there (no mask input).
"""
from __future__ import annotations

import torch

from lctrain.ops.attention_ref import causal_mask

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether this backend computes the case exactly."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return False
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if q.device.type == "cuda":
        sq, sk, d = q.shape[1], k.shape[1], q.shape[3]
        return q.dtype in _CUDA_DTYPES and d <= 256 and d % 8 == 0 and not (causal and sq < sk)
    return False


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [b, s, h, d] <-> [b, h, s, d]


def _additive_mask(sq: int, sk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    m = torch.zeros(sq, sk, dtype=dtype, device=device)
    return m.masked_fill_(~causal_mask(sq, sk, device), float("-inf"))


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _sum_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // groups, groups, d).sum(3)


def _cpu_forward(q, k, v, causal, mask, scale):
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _t(q), _t(k), _t(v), 0.0, causal and mask is None, attn_mask=mask, scale=scale)
    return _t(o), lse  # [b, sq, h, d], [b, h, sq]


def _cpu_backward(do, q, k, v, o, lse, causal, mask, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(do), _t(q), _t(k), _t(v), _t(o), lse.to(_lse_dtype(q.dtype)).contiguous(), 0.0,
        causal and mask is None, attn_mask=mask, scale=scale)
    return _t(dq), _t(dk), _t(dv)


def _cuda_forward(q, k, v, causal, scale):
    g = q.shape[2] // k.shape[2]
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _t(q), _t(_repeat_kv(k, g)), _t(_repeat_kv(v, g)), 0.0, causal, False, scale=scale)
    return _t(res[0]), res[1], res


def _cuda_backward(do, q, k, v, o, lse, causal, scale):
    g = q.shape[2] // k.shape[2]
    kr, vr = _repeat_kv(k, g), _repeat_kv(v, g)
    _, _, aux = _cuda_forward(q, k, v, causal, scale)
    _, _, cum_q, cum_k, max_q, max_k, seed, offset, _ = aux
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _t(do), _t(q), _t(kr), _t(vr), _t(o), lse.float().contiguous(), cum_q, cum_k, max_q, max_k, 0.0, causal,
        seed, offset, scale=scale)
    return _t(dq), _sum_kv(_t(dk), g), _sum_kv(_t(dv), g)


def _square(q: torch.Tensor, k: torch.Tensor, causal: bool) -> int:
    """Rows of q that see no key under bottom-right alignment (sq > sk); they are cut off."""
    return max(q.shape[1] - k.shape[1], 0) if causal else 0


def sdpa_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                           softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `[b, sq, h, d]` and lse `[b, h, sq]` (see :mod:`lctrain.ops.attention`)."""
    b, sq, h, d = q.shape
    cut = _square(q, k, causal)
    if cut:
        o = torch.zeros_like(q)
        lse = torch.full((b, h, sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
        o[:, cut:], lse[:, :, cut:] = sdpa_attention_forward(q[:, cut:], k, v, causal, softmax_scale)
        return o, lse
    if q.device.type == "cuda":
        o, lse, _ = _cuda_forward(q, k, v, causal, softmax_scale)
        return o, lse
    mask = _additive_mask(sq, k.shape[1], q.dtype, q.device) if causal and sq < k.shape[1] else None
    return _cpu_forward(q, k, v, causal, mask, softmax_scale)


def sdpa_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, causal: bool,
                            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq `[b, sq, h, d]`, dk and dv `[b, sk, h_kv, d]` for the given (possibly merged) o and lse."""
    cut = _square(q, k, causal)
    if cut:
        dq = torch.zeros_like(q)
        dq[:, cut:], dk, dv = sdpa_attention_backward(do[:, cut:], q[:, cut:], k, v, o[:, cut:], lse[:, :, cut:],
                                                      causal, softmax_scale)
        return dq, dk, dv
    if q.device.type == "cuda":
        return _cuda_backward(do, q, k, v, o, lse, causal, softmax_scale)
    sq, sk = q.shape[1], k.shape[1]
    mask = _additive_mask(sq, sk, q.dtype, q.device) if causal and sq < sk else None
    return _cpu_backward(do, q, k, v, o, lse, causal, mask, softmax_scale)
