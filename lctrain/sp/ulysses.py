"""Ulysses attention: all-to-all from sequence-sharded to head-sharded, full local attention, all-to-all back.

Each rank trades its `[b, s_local, h, d]` for `[b, P*s_local, h/P, d]` (the whole sequence, 1/P of the
heads), runs ordinary attention, and trades back. Forward: one all-to-all for Q, one for the packed K/V,
one for the output; backward: the same three in reverse. Heads must divide by P; kv heads must divide by P,
or (kv_heads < P, P % kv_heads == 0) each kv head is replicated P/kv_heads times before the exchange and the
replicas' gradients are summed back (autograd of the replication). Under the zigzag layout the pieces that
arrive are concatenated straight into global sequence order (one copy, no separate reorder), and the output
is cut back into each rank's chunks before the return exchange.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention
from lctrain.ops.attention_varlen import varlen_attention
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.sp.utils import check_inputs, rank_major_positions, resolve_scale


def _seq_pieces(x: torch.Tensor, size: int, zigzag: bool) -> list[torch.Tensor]:
    """Split a global-order `[b, S, ...]` into what each rank holds: rank j gets chunk j (contiguous) or chunks
    j and 2P-1-j (zigzag), as views."""
    if not zigzag:
        return list(x.chunk(size, dim=1))
    chunks = x.chunk(2 * size, dim=1)
    return [torch.cat([chunks[j], chunks[2 * size - 1 - j]], dim=1) for j in range(size)]


def _global_order(pieces: list[torch.Tensor], zigzag: bool) -> torch.Tensor:
    """Inverse of `_seq_pieces`: one concatenation straight into global sequence order (one copy)."""
    if not zigzag:
        return torch.cat(pieces, dim=1)
    halves = [p.chunk(2, dim=1) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=1)


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None, zigzag: bool) -> torch.Tensor:
    """`[b, s_local, H, ...]` -> `[b, S, H/P, ...]` in global order: rank j receives head group j."""
    size = comm.group_size(group)
    return _global_order(comm.all_to_all_list(list(x.chunk(size, dim=2)), group), zigzag)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None, zigzag: bool) -> torch.Tensor:
    """`[b, S, H/P, ...]` (global order) -> `[b, s_local, H, ...]`: rank j receives its own tokens."""
    size = comm.group_size(group)
    return torch.cat(comm.all_to_all_list(_seq_pieces(x, size, zigzag), group), dim=2)


class _SeqToHeads(torch.autograd.Function):
    """Sequence-sharded -> head-sharded (global order); the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, zigzag):
        ctx.group, ctx.zigzag = group, zigzag
        return _seq_to_heads(x, group, zigzag)

    @staticmethod
    def backward(ctx, grad):
        with comm.comm_tag("ulysses.bwd"):
            return _heads_to_seq(grad, ctx.group, ctx.zigzag), None, None


class _HeadsToSeq(torch.autograd.Function):
    """Head-sharded (global order) -> sequence-sharded; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, zigzag):
        ctx.group, ctx.zigzag = group, zigzag
        return _heads_to_seq(x, group, zigzag)

    @staticmethod
    def backward(ctx, grad):
        with comm.comm_tag("ulysses.bwd"):
            return _seq_to_heads(grad, ctx.group, ctx.zigzag), None, None


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
                      layout: Layout = "zigzag",
                      cu_seqlens: torch.Tensor | PackedDocuments | None = None) -> torch.Tensor:
    """Exact softmax attention over the CP-sharded sequence by exchanging sequence shards for head shards.

    Args:
        q: this rank's queries `[b, s_local, h, d]`, `h % CP == 0`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`; `h_kv % CP == 0` or `CP % h_kv == 0`.
        group: the CP group (default: the mesh's CP group, else the world).
        causal: causal mask over global positions.
        softmax_scale: default 1/sqrt(d).
        layout: how the sequence was sharded ("zigzag" or "contiguous"); only matters when causal.
        cu_seqlens: packed documents (int `[n_docs + 1]`, global boundaries of the un-sharded `batch * seq`
            tokens, the same on every rank, on q's device), or the batch's `lctrain.sp.documents.PackedDocuments`:
            attention stays within a document (the gathered
            sequence stays in rank-major order under a document mask, `lctrain.ops.attention_varlen`).
    Returns:
        This rank's output `[b, s_local, h, d]`.
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("ulysses_attention", q, k, v, group, causal, layout, scale, extra=_head_problem,
                 cu_seqlens=cu_seqlens)
    size = comm.group_size(group)
    if k.shape[2] < size:
        k = k.repeat_interleave(size // k.shape[2], dim=2)  # [b, s_local, P, d]
        v = v.repeat_interleave(size // v.shape[2], dim=2)
    # Non-causal attention does not depend on key order, so the zigzag reorder is skipped; so it is with packed
    # documents, whose mask is built from the tokens' global positions in rank-major order.
    zigzag = causal and layout == "zigzag" and size > 1 and cu_seqlens is None
    with comm.comm_tag("ulysses.fwd"):
        qh = _SeqToHeads.apply(q, group, zigzag)  # [b, S, h/P, d], global order
        kvh = _SeqToHeads.apply(torch.stack([k, v], dim=3), group, zigzag)  # [b, S, h_kv/P, 2, d]
    if cu_seqlens is None:
        oh = attention(qh, kvh[..., 0, :], kvh[..., 1, :], causal, scale)  # [b, S, h/P, d]
    else:
        pos = rank_major_positions(size, q.shape[1], layout, q.device)
        docs = as_documents(cu_seqlens, q, comm.group_rank(group), size, layout).ids_at(pos)  # [b, S], no sync
        oh = varlen_attention(qh, kvh[..., 0, :], kvh[..., 1, :], pos, pos, docs, docs, causal, scale)
    with comm.comm_tag("ulysses.fwd"):
        return _HeadsToSeq.apply(oh, group, zigzag)  # [b, s_local, h, d]
