"""Plain-PyTorch definition of softmax attention with log-sum-exp, GQA and bottom-right causal alignment.

Query row i (of sq) sees key j (of sk) when j <= i + (sk - sq): the queries are the last sq positions of
the keys, as in flash-attn. A row that sees no key gets o = 0 and lse = -inf. Computed in float32
(float64 stays float64); differentiable through autograd.
"""
from __future__ import annotations

import math

import torch


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention.

    Args:
        q: [b, sq, h, d]; k, v: [b, sk, h_kv, d] with h % h_kv == 0.
        causal: mask keys after each query (bottom-right aligned when sq != sk).
        softmax_scale: multiplies q . k; None means 1 / sqrt(d).

    Returns:
        o [b, sq, h, d] in q's dtype and lse [b, h, sq] float32 (float64 for float64 inputs), natural log.
    """
    sq, h, d = q.shape[1], q.shape[2], q.shape[3]
    sk, h_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(dtype).transpose(1, 2)  # [b, h, sq, d]
    kf = k.to(dtype).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)  # [b, h, sk, d]
    vf = v.to(dtype).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (sk - sq), float("-inf"))
    # Shift by the row max (detached: the result does not depend on it); rows with no key keep l = 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - shift)  # [b, h, sq, sk]
    l = e.sum(dim=-1, keepdim=True)
    visible = l > 0
    o = (e / torch.where(visible, l, torch.ones_like(l))) @ vf  # [b, h, sq, d]
    lse = torch.where(visible, shift + torch.log(torch.where(visible, l, torch.ones_like(l))),
                      torch.full_like(l, float("-inf"))).squeeze(-1)  # [b, h, sq]
    out_lse = lse if dtype == torch.float64 else lse.float()
    return o.transpose(1, 2).to(q.dtype), out_lse
