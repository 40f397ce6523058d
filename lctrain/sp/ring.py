"""Ring attention: exact softmax attention with K/V blocks travelling around the CP ring.

Forward, CP = P ranks: at step t rank r holds the K/V block of rank j = (r - t) mod P. It posts the send of
that block to r+1 and the receive of the next one from r-1 (one packed K/V buffer, async), computes its queries
against the held block while the transfer runs, and merges the partial result by log-sum-exp. P-1 transfers
per rank; K/V travel with their own kv_heads (GQA is never expanded on the wire).

Causal blocks (global chunk order decides visibility):
- zigzag (rank r holds chunks r and 2P-1-r of 2P, each c = s_local/2 long): j == r is the causal diagonal;
  j < r: all local queries see the first chunk of the block (chunk j); j > r: only the second local chunk
  (2P-1-r) sees the block, all of it. Every rank does the same work at every step.
- contiguous: j == r causal; j < r fully visible; j > r fully masked and skipped (not computed).

Backward: K/V travel again; the dK/dV accumulator of each block travels with it (added to by every rank the
block visits, then delivered home after P sends) while dQ stays local. Every block's gradient is computed
from the final merged (o, lse), which is exact (derivation and the visibility table: README_softmax.md).
P2P batches post sends and receives together, so the ordering is deadlock-free for any ring size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention_backward, attention_forward
from lctrain.ops.attention_varlen import (DocumentMask, varlen_attention_backward,
                                          varlen_attention_forward)
from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp import window_blocks
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.sp.utils import check_inputs, compute_dtype, merge_attention, rank_positions, resolve_scale

_ALL = slice(None)


def _block(rank: int, src: int, causal: bool, layout: str, s: int) -> tuple[slice, slice, bool] | None:
    """(query rows, key rows, causal) of rank `rank`'s queries against the block of rank `src`; None: skip."""
    if not causal:
        return _ALL, _ALL, False
    if src == rank:
        return _ALL, _ALL, True
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    c = s // 2
    return (_ALL, slice(0, c), False) if src < rank else (slice(c, s), _ALL, False)


def _shift(buf: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
           size: int) -> tuple[torch.Tensor, comm.P2PHandle]:
    """Post: send `buf` to the next rank, receive the previous rank's into a new buffer."""
    incoming = torch.empty_like(buf)
    handle = comm.batch_isend_irecv([P2POp("send", buf, (rank + 1) % size),
                                     P2POp("recv", incoming, (rank - 1) % size)], group)
    return incoming, handle


def _doc_block(docs: PackedDocuments, src: int, causal: bool) -> tuple[slice, slice, torch.Tensor] | None:
    """Packed documents: (query rows, key rows, mask) of this rank's queries against rank `src`'s keys, on the
    rows the causal plan (`_block`) leaves; None: nothing visible. Key document ids: searchsorted, no sync."""
    plan = _block(docs.rank, src, causal, docs.layout, docs.s_local)
    if plan is None:
        return None
    qs, ks, _ = plan
    q_pos = docs.token_positions[qs]
    k_pos = rank_positions(src, docs.world, docs.s_local, docs.layout, q_pos.device)[ks]
    # Named per batch (docs) and source rank: the GPU branch builds this block's mask once for every layer.
    return qs, ks, DocumentMask(q_pos, k_pos, docs.doc_ids[:, qs], docs.ids_at(k_pos), causal, (docs, ("ring", src)))


def _window_block(rank: int, src: int, size: int, s: int, b: int, layout: str, window: int,
                  docs: PackedDocuments | None, device: torch.device) -> tuple[slice, slice, torch.Tensor] | None:
    """Sliding window: the visible box of this rank's queries against rank `src`'s keys, masked; None: skipped."""
    plan = _block(rank, src, True, layout, s)
    if plan is None:
        return None
    q_runs, k_runs = (window_blocks.rank_runs(r, size, s, layout) for r in (rank, src))
    box = window_blocks.visible_box(window_blocks.restrict(q_runs, plan[0], s),
                                    window_blocks.restrict(k_runs, plan[1], s), window)
    if box is None:
        return None
    qs, ks = box
    q_pos, k_pos = window_blocks.positions(q_runs, qs, s, device), window_blocks.positions(k_runs, ks, s, device)
    # Named within the batch, so every layer reuses one BlockMask for this (rank, src) box.
    return qs, ks, window_blocks.block_mask(q_pos, k_pos, window, b, docs,
                                            ("ring-window", src, qs.start, qs.stop, ks.start, ks.stop))


def _masked_block(docs: PackedDocuments | None, window: int | None, rank: int, src: int, size: int, s: int, b: int,
                  causal: bool, layout: str, device: torch.device) -> tuple[slice, slice, object] | None:
    if window is None:
        return _doc_block(docs, src, causal)
    return _window_block(rank, src, size, s, b, layout, window, docs, device)


def _ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, causal: bool,
                  scale: float, layout: str, docs: PackedDocuments | None = None,
                  window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    size, rank = comm.group_size(group), comm.group_rank(group)
    b, s, h, d = q.shape
    acc = compute_dtype(q.dtype)
    out = torch.zeros(b, s, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack([k, v])  # [2, b, s, h_kv, d]: one buffer per transfer
    for step in range(size):
        incoming, handle = _shift(kv, group, rank, size) if step + 1 < size else (None, None)
        src = (rank - step) % size
        if docs is not None or window is not None:
            if (blk := _masked_block(docs, window, rank, src, size, s, b, causal, layout, q.device)) is not None:
                qs, ks, mask = blk
                o_b, lse_b = varlen_attention_forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], mask, scale)
                merge_attention(out[:, qs], lse[:, :, qs], o_b, lse_b)
        elif (plan := _block(rank, src, causal, layout, s)) is not None:
            qs, ks, blk_causal = plan
            o_b, lse_b = attention_forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], blk_causal, scale)
            merge_attention(out[:, qs], lse[:, :, qs], o_b, lse_b)
        if handle is not None:
            handle.wait()
            kv = incoming
    return out.to(q.dtype), lse


def _ring_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, group: dist.ProcessGroup | None, causal: bool, scale: float,
                   layout: str, docs: PackedDocuments | None = None,
                   window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, rank = comm.group_size(group), comm.group_rank(group)
    s = q.shape[1]
    acc = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])  # [2, b, s, h_kv, d]
    dkv_in, dkv_handle = None, None
    for step in range(size):
        incoming, kv_handle = _shift(kv, group, rank, size) if step + 1 < size else (None, None)
        src = (rank - step) % size
        grads, ks = None, _ALL
        if docs is not None or window is not None:
            if (blk := _masked_block(docs, window, rank, src, size, s, q.shape[0], causal, layout,
                                     q.device)) is not None:
                qs, ks, mask = blk
                grads = varlen_attention_backward(do[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                                  lse[:, :, qs], mask, scale)
                dq[:, qs] += grads[0]
        elif (plan := _block(rank, src, causal, layout, s)) is not None:
            qs, ks, blk_causal = plan
            grads = attention_backward(do[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs],
                                       blk_causal, scale)
            dq[:, qs] += grads[0]
        # The accumulator of the block we hold arrives from the previous rank (ours starts at zero).
        if dkv_handle is None:
            dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        else:
            dkv_handle.wait()
            dkv = dkv_in
        if grads is not None:
            dkv[0][:, ks] += grads[1]
            dkv[1][:, ks] += grads[2]
        if size > 1:
            dkv_in, dkv_handle = _shift(dkv, group, rank, size)
        else:
            dkv_in = dkv
        if kv_handle is not None:
            kv_handle.wait()
            kv = incoming
    if dkv_handle is not None:
        dkv_handle.wait()  # after P sends our own block's accumulator is home
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, docs, window=None):
        with comm.comm_tag("ring.fwd"):
            out, lse = _ring_forward(q, k, v, group, causal, scale, layout, docs, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout, ctx.docs = group, causal, scale, layout, docs
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        with comm.comm_tag("ring.bwd"):
            dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, out, lse, ctx.group, ctx.causal, ctx.scale,
                                        ctx.layout, ctx.docs, ctx.window)
        return dq, dk, dv, None, None, None, None, None, None


@torch.compiler.disable
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                   causal: bool = True, softmax_scale: float | None = None, layout: Layout = "zigzag",
                   cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                   window: int | None = None) -> torch.Tensor:
    """Exact softmax attention over the sequence sharded across the CP group, K/V passed around a ring.

    Args:
        q: this rank's queries `[b, s_local, h, d]`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`, `h % h_kv == 0`.
        group: the CP group (default: the mesh's CP group, else the world).
        causal: causal mask over global positions.
        softmax_scale: default 1/sqrt(d).
        layout: how the sequence was sharded ("zigzag" or "contiguous", see `shard_sequence`).
        cu_seqlens: packed documents (int `[n_docs + 1]`, global boundaries of the un-sharded `batch * seq`
            tokens, the same on every rank, on q's device), or the batch's `lctrain.sp.documents.PackedDocuments`:
            attention stays within a document. Each block is then masked by document and position
            (`lctrain.ops.attention_varlen`).
        window: a sliding window W (causal only): query i sees keys i - W < j <= i. K/V still travel the whole
            ring; blocks wholly outside the window are skipped and the rest is cut to its visible box
            (`lctrain.sp.window_blocks`). `halo_attention` moves only the window's keys.
    Returns:
        This rank's output `[b, s_local, h, d]`.
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("ring_attention", q, k, v, group, causal, layout, scale, cu_seqlens=cu_seqlens,
                 extra=lambda *_: window_blocks.window_problem(window, causal))
    docs = None if cu_seqlens is None else as_documents(cu_seqlens, q, comm.group_rank(group),
                                                        comm.group_size(group), layout)
    return _RingAttention.apply(q, k, v, group, causal, scale, layout, docs, window)
