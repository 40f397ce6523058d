"""All-gather K/V attention (LASP-2H's choice for softmax layers, as in Llama 3's context parallelism).

Forward: ONE all-gather of the packed K/V (cheap with GQA: kv_heads only), reordered into global sequence
order; each local query chunk then attends to the keys up to its own end, causal with bottom-right
alignment: zigzag rank r has chunks r and 2P-1-r (c = s_local/2 each), so its first chunk reads keys
[0, (r+1)c) and its second [0, (2P-r)c); contiguous rank r reads [0, (r+1)s_local). Non-causal: all keys.
Backward: dK/dV of the full sequence are accumulated locally and ONE reduce-scatter returns each rank its
own slice (summed over every rank's queries). The gathered K/V are kept for the backward rather than
gathered again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention_backward, attention_forward
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp.utils import (check_inputs, compute_dtype, global_to_rank_major, rank_major_to_global,
                              resolve_scale)


def _pieces(rank: int, size: int, s: int, causal: bool, layout: str) -> list[tuple[slice, int | None]]:
    """(local query rows, number of leading global keys they attend to; None: all) per local chunk."""
    if not causal:
        return [(slice(None), None)]
    if layout == "contiguous" or size == 1:
        return [(slice(None), (rank + 1) * s)]
    c = s // 2
    return [(slice(0, c), (rank + 1) * c), (slice(c, s), (2 * size - rank) * c)]


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout):
        size, rank = comm.group_size(group), comm.group_rank(group)
        # Non-causal attention does not depend on key order, so the reordering is skipped.
        order = layout if causal else "contiguous"
        with comm.comm_tag("allgather.fwd"):
            kv = comm.all_gather(torch.stack([k, v]), group, dim=2)  # [2, b, P*s_local, h_kv, d], rank order
        kv = rank_major_to_global(kv, size, 2, order)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=compute_dtype(q.dtype), device=q.device)
        pieces = _pieces(rank, size, q.shape[1], causal, layout)
        for qs, end in pieces:
            out[:, qs], lse[:, :, qs] = attention_forward(q[:, qs], kv[0][:, :end], kv[1][:, :end], causal, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.order, ctx.pieces = group, causal, scale, order, pieces
        return out

    @staticmethod
    def backward(ctx, do):
        q, kv, out, lse = ctx.saved_tensors
        do = do.contiguous()
        size = comm.group_size(ctx.group)
        dq = torch.empty_like(q)
        dkv = torch.zeros(kv.shape, dtype=compute_dtype(kv.dtype), device=kv.device)  # [2, b, S, h_kv, d]
        for qs, end in ctx.pieces:
            dq[:, qs], dk, dv = attention_backward(do[:, qs], q[:, qs], kv[0][:, :end], kv[1][:, :end], out[:, qs],
                                                   lse[:, :, qs], ctx.causal, ctx.scale)
            dkv[0][:, :end] += dk
            dkv[1][:, :end] += dv
        dkv = global_to_rank_major(dkv, size, 2, ctx.order)
        with comm.comm_tag("allgather.bwd"):
            dkv = comm.reduce_scatter(dkv, ctx.group, dim=2)  # [2, b, s_local, h_kv, d]
        return dq, dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None, None


@torch.compiler.disable
def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                        causal: bool = True, softmax_scale: float | None = None,
                        layout: Layout = "zigzag") -> torch.Tensor:
    """Exact softmax attention over the CP-sharded sequence with one K/V all-gather (one dK/dV reduce-scatter).

    Args:
        q: this rank's queries `[b, s_local, h, d]`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`, `h % h_kv == 0`.
        group: the CP group (default: the mesh's CP group, else the world).
        causal: causal mask over global positions.
        softmax_scale: default 1/sqrt(d).
        layout: how the sequence was sharded ("zigzag" or "contiguous").
    Returns:
        This rank's output `[b, s_local, h, d]`.
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("allgather_attention", q, k, v, group, causal, layout, scale)
    return _AllGatherAttention.apply(q, k, v, group, causal, scale, layout)
