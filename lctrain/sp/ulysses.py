"""Ulysses attention: all-to-all from sequence-sharded to head-sharded, full local attention, all-to-all back.

Each rank trades its `[b, s_local, h, d]` for `[b, P*s_local, h/P, d]` (the whole sequence, 1/P of the
heads), runs ordinary attention, and trades back. Forward: one all-to-all for Q, one for the packed K/V,
one for the output; backward: the same three in reverse. Heads must divide by P; kv heads must divide by P,
or (kv_heads < P, P % kv_heads == 0) each kv head is replicated P/kv_heads times before the exchange and the
replicas' gradients are summed back (autograd of the replication). Under the zigzag layout the gathered
sequence arrives in rank order and is put into global order before causal attention (and back after).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp.utils import check_inputs, global_to_rank_major, rank_major_to_global, resolve_scale


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` over the group and gather `gather_dim`; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return comm.all_to_all(x, group, scatter_dim=scatter_dim, gather_dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        with comm.comm_tag("ulysses.bwd"):
            return comm.all_to_all(grad.contiguous(), ctx.group, scatter_dim=gather_dim,
                                   gather_dim=scatter_dim), None, None, None


def _head_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int) -> str | None:
    h, hk = q.shape[2], k.shape[2]
    if h % cp:
        return f"Ulysses needs heads divisible by CP: {h} heads over CP={cp}"
    if hk % cp and cp % hk:
        return (f"Ulysses needs kv heads divisible by CP, or CP divisible by kv heads (to replicate them): "
                f"{hk} kv heads over CP={cp}")
    return None


@torch.compiler.disable
def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                      causal: bool = True, softmax_scale: float | None = None,
                      layout: Layout = "zigzag") -> torch.Tensor:
    """Exact softmax attention over the CP-sharded sequence by exchanging sequence shards for head shards.

    Args:
        q: this rank's queries `[b, s_local, h, d]`, `h % CP == 0`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`; `h_kv % CP == 0` or `CP % h_kv == 0`.
        group: the CP group (default: the mesh's CP group, else the world).
        causal: causal mask over global positions.
        softmax_scale: default 1/sqrt(d).
        layout: how the sequence was sharded ("zigzag" or "contiguous"); only matters when causal.
    Returns:
        This rank's output `[b, s_local, h, d]`.
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("ulysses_attention", q, k, v, group, causal, layout, scale, extra=_head_problem)
    size = comm.group_size(group)
    if k.shape[2] < size:
        k = k.repeat_interleave(size // k.shape[2], dim=2)  # [b, s_local, P, d]
        v = v.repeat_interleave(size // v.shape[2], dim=2)
    order = layout if causal else "contiguous"
    with comm.comm_tag("ulysses.fwd"):
        qh = _AllToAll.apply(q, group, 2, 1)  # [b, P*s_local, h/P, d]
        kvh = _AllToAll.apply(torch.stack([k, v], dim=2), group, 3, 1)  # [b, P*s_local, 2, h_kv/P, d]
    qh = rank_major_to_global(qh, size, 1, order)
    kvh = rank_major_to_global(kvh, size, 1, order)
    oh = attention(qh, kvh[:, :, 0], kvh[:, :, 1], causal, scale)  # [b, S, h/P, d]
    oh = global_to_rank_major(oh, size, 1, order)
    with comm.comm_tag("ulysses.fwd"):
        return _AllToAll.apply(oh.contiguous(), group, 1, 2)  # [b, s_local, h, d]
