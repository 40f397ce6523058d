"""Rotary position embedding (RoPE, Llama convention: rotate the two halves of each head).

For a head vector x at global position p, with inv_freq_i = theta^(-2i/d), i < d/2:
    x' = x * cos(p * inv_freq) + rotate_half(x) * sin(p * inv_freq),  rotate_half([a, b]) = [-b, a].
Positions are each token's GLOBAL index in the sequence (passed in), so a zigzag or contiguous CP shard
rotates exactly as the same token would in one process. With packed documents the positions are indices
within each token's document (`[b, s]`, from :func:`lctrain.models.packing.document_tables`): RoPE
restarts at every document.
"""
from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[s, head_dim]` (or `[b, s, head_dim]`) for int64 `position_ids` `[s]` (or `[b, s]`);
    angles computed in float64."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq  # [..., s, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., s, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[b, s, h, d]` by the tables `[s, d]` or `[b, s, d]` from :func:`rope_cos_sin`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return x * cos + rotated * sin
