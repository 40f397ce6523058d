"""Causal linear attention with per-head decay: the naive O(N^2) definition every other path is tested against.

For each head h with decay lambda = exp(log_decay[h]) <= 1 and an optional state S0 entering the sequence
(t, s 0-indexed):

    o_t   = q_t . (lambda^(t+1) S0 + sum_{s<=t} lambda^(t-s) k_s^T v_s)
    final = lambda^n S0 + sum_s lambda^(n-1-s) k_s^T v_s

computed literally: the masked, decayed score matrix (q k^T) * D with D[t, s] = lambda^(t-s) for s <= t.
Math runs in float64 for float64 inputs and in float32 otherwise.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed (and carries its states) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                         initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Naive causal linear attention (differentiable through autograd).

    Args:
        q, k: `[b, n, h, dk]`.
        v: `[b, n, h, dv]`.
        log_decay: `[h]`, log(lambda) <= 0 per head; None means lambda = 1.
        initial_state: `[b, h, dk, dv]` state entering the sequence, or None (zeros).
        output_final_state: also return the state after the last token.
    Returns:
        `o` `[b, n, h, dv]` in v's dtype, and the final state `[b, h, dk, dv]` (float32, float64 for float64
        inputs) or None.
    """
    cdt = compute_dtype(q.dtype)
    n = q.shape[1]
    qf, kf, vf = (x.to(cdt).transpose(1, 2) for x in (q, k, v))  # [b, h, n, d]
    t = torch.arange(n, device=q.device)
    dist = (t[:, None] - t[None, :]).to(cdt)  # [n, n], t - s
    causal = dist >= 0
    if log_decay is None:
        decay = causal.to(cdt).expand(1, 1, n, n)
        q_in = qf
    else:
        ld = log_decay.to(cdt)[None, :, None, None]  # [1, h, 1, 1]
        # Clamp before exp: lambda^(t-s) for s > t would overflow and poison gradients through the mask.
        decay = torch.exp(ld * dist.clamp_min(0)) * causal  # [1, h, n, n]
        q_in = qf * torch.exp(ld * (t + 1).to(cdt)[:, None])  # [b, h, n, dk]
    scores = (qf @ kf.transpose(-1, -2)) * decay  # [b, h, n, n]
    o = scores @ vf  # [b, h, n, dv]
    if initial_state is not None:
        o = o + q_in @ initial_state.to(cdt)
    final = None
    if output_final_state:
        if log_decay is None:
            final = kf.transpose(-1, -2) @ vf
            if initial_state is not None:
                final = final + initial_state.to(cdt)
        else:
            ld = log_decay.to(cdt)[None, :, None, None]
            k_w = kf * torch.exp(ld * (n - 1 - t).to(cdt)[:, None])  # [b, h, n, dk]
            final = k_w.transpose(-1, -2) @ vf  # [b, h, dk, dv]
            if initial_state is not None:
                final = final + torch.exp(ld * n) * initial_state.to(cdt)
    return o.transpose(1, 2).to(v.dtype), final
