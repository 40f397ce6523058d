"""Merge of partial softmax attentions over disjoint key sets, by their log-sum-exp.

For the same queries and key sets a, b:
    lse = logaddexp(lse_a, lse_b),   o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)
done in float32 (float64 for float64 inputs); a row that saw no key yet has lse = -inf and weight 0.
Used by the ring (one merge per visiting K/V block) and by backends that split a causal problem.
"""
from __future__ import annotations

import torch


def merge_attention(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Merge a block's partial attention into the running (out, lse), in place.

    Args:
        out: running output `[b, s, h, d]` in the accumulation dtype (float32/float64); updated in place.
        lse: running log-sum-exp `[b, h, s]`, same dtype; updated in place.
        block_out: the block's output `[b, s, h, d]`.
        block_lse: the block's log-sum-exp `[b, h, s]`.
    """
    block_lse = block_lse.to(lse.dtype)
    new = torch.logaddexp(lse, block_lse)
    # Both -inf (no key seen in either): keep -inf and give both weights 0 instead of NaN.
    ref = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    w_old = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)  # [b, s, h, 1]
    w_new = torch.exp(block_lse - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(block_out.to(out.dtype) * w_new)
    lse.copy_(new)
