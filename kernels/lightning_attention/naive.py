"""Plain-PyTorch definition of lightning attention (causal linear attention with per-head decay).

    o_t   = q_t (lambda^(t+1) S0 + sum_{s<=t} lambda^(t-s) k_s^T v_s)
    final = lambda^n S0 + sum_{s<n} lambda^(n-1-s) k_s^T v_s

written as one masked, decayed score matrix (quadratic in the sequence length: the reference, not a fast
path). Computed in float32 (float64 stays float64); differentiable in everything, log_decay included.
"""
from __future__ import annotations

import torch


def naive_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              log_decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                              output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference lightning attention.

    Args:
        q, k: [b, s, h, dk]; v: [b, s, h, dv].
        log_decay: [h], log(lambda) <= 0 per head; None means lambda = 1.
        initial_state: [b, h, dk, dv] state before the first token; None means zeros.
        output_final_state: also return the state after the last token.

    Returns:
        o [b, s, h, dv] in v's dtype, and the final state [b, h, dk, dv] in float32 (float64 for float64
        inputs) or None.
    """
    b, n, h, _ = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    gamma = torch.zeros(h, dtype=dtype, device=q.device) if log_decay is None else log_decay.to(dtype)
    t = torch.arange(n, device=q.device, dtype=dtype)
    diff = t[:, None] - t[None, :]  # [s, s], t - s
    causal = diff >= 0
    decay = torch.where(causal, torch.exp(gamma[:, None, None] * diff.clamp(min=0)), torch.zeros((), dtype=dtype,
                                                                                                device=q.device))
    scores = (qf @ kf.transpose(-1, -2)) * decay  # [b, h, s, s]
    o = scores @ vf  # [b, h, s, dv]
    if initial_state is not None:
        s0 = initial_state.to(dtype)
        o = o + torch.exp(gamma[:, None] * (t + 1))[None, :, :, None] * (qf @ s0)
    final = None
    if output_final_state:
        k_decay = torch.exp(gamma[:, None] * (n - 1 - t))  # [h, s]
        final = (kf * k_decay[None, :, :, None]).transpose(-1, -2) @ vf  # [b, h, dk, dv]
        if initial_state is not None:
            final = final + torch.exp(gamma * n)[None, :, None, None] * initial_state.to(dtype)
    return o.transpose(1, 2).to(v.dtype), final
