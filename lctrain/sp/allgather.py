"""All-gather K/V attention (LASP-2H's choice for softmax layers, as in Llama 3's context parallelism).

Forward: ONE all-gather of the packed K/V (cheap with GQA: kv_heads only), started asynchronously; while it is
in flight each rank computes its queries against its OWN keys (the causal diagonal: zigzag chunks r and 2P-1-r
each against itself, stacked in the batch; contiguous: the local block), which need no other rank. Then the
remote keys each local query chunk sees are attended to (non-causal: every such key is in the past) and merged
by log-sum-exp: zigzag rank r has chunks r and 2P-1-r (c = s_local/2 each), so its first chunk reads global
keys [0, r c) and its second [0, (2P-1-r) c) besides its own chunk; contiguous rank r reads [0, r s_local).
Non-causal: every other rank's keys.
Backward: K/V are gathered AGAIN (as Llama 3's context parallelism does) rather than kept from forward, so a
layer keeps only its own q, k, v, o and lse (O(S/P)); the re-gather is started first and overlapped with the
diagonal blocks' gradients. dK/dV of the remote keys are accumulated into one full-sequence buffer and ONE
reduce-scatter returns each rank its slice (summed over every rank's queries).

The gathered K/V travel sequence-first (`[P*s_local, b, 2, h_kv, d]`, rank-major), so a contiguous run of
keys is a view; zigzag keys are put in global order by one index_select (the only full-sequence copy, transient).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention_backward, attention_forward
from lctrain.ops.attention_varlen import (DocumentMask, varlen_attention_backward,
                                          varlen_attention_forward)
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp import window_blocks
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.sp.utils import (check_inputs, compute_dtype, merge_attention, rank_major_positions,
                              resolve_scale)

#: (local query rows, first key, end key) of one remote block, in the coordinates of the gathered K/V.
Block = tuple[slice, int, int]


def _pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`[b, s, h_kv, d]` x 2 -> `[s, b, 2, h_kv, d]` (sequence first, so a rank-major gather is global order)."""
    buf = torch.empty((k.shape[1], k.shape[0], 2) + tuple(k.shape[2:]), dtype=k.dtype, device=k.device)
    buf[:, :, 0] = k.transpose(0, 1)
    buf[:, :, 1] = v.transpose(0, 1)
    return buf


def _zigzag_order(size: int, device: torch.device) -> torch.Tensor:
    """For global chunk g (of 2P): its position in a rank-major gather (rank r holds chunks r, 2P-1-r)."""
    g = torch.arange(2 * size, device=device)
    return torch.where(g < size, 2 * g, 2 * (2 * size - 1 - g) + 1)


def _zigzag(size: int, causal: bool, layout: str) -> bool:
    """Whether the causal zigzag split applies (two chunks per rank, global order matters)."""
    return causal and layout == "zigzag" and size > 1


def _remote_blocks(rank: int, size: int, s: int, causal: bool, layout: str) -> list[Block]:
    """The non-causal blocks of other ranks' keys each local query chunk sees (global order when causal zigzag)."""
    if not causal:
        return [b for b in ((slice(None), 0, rank * s), (slice(None), (rank + 1) * s, size * s)) if b[2] > b[1]]
    if not _zigzag(size, causal, layout):
        return [(slice(None), 0, rank * s)] if rank > 0 else []
    c = s // 2
    blocks = [(slice(0, c), 0, rank * c)] if rank > 0 else []
    return blocks + [(slice(c, s), 0, (2 * size - 1 - rank) * c)]


def _diag(x: torch.Tensor, n: int) -> torch.Tensor:
    """`[b, n*c, ...]` -> `[n*b, c, ...]`: a rank's chunks side by side in the batch (each attends to itself)."""
    return torch.cat(x.chunk(n, dim=1), dim=0) if n > 1 else x


def _undiag(x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    return torch.cat(x.chunk(n, dim=0), dim=dim) if n > 1 else x


def _gathered(pending: comm.Pending, size: int, zigzag: bool) -> torch.Tensor:
    """Wait for the K/V gather; causal zigzag: put the chunks in global order (one copy)."""
    kv = pending.wait()  # [P*s, b, 2, h_kv, d], rank-major
    if not zigzag:
        return kv
    chunks = kv.view(2 * size, kv.shape[0] // (2 * size), *kv.shape[1:])
    return chunks.index_select(0, _zigzag_order(size, kv.device)).flatten(0, 1)


def _keys(kv: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views `[b, end-start, h_kv, d]` of the keys and values at gathered positions [start, end)."""
    blk = kv[start:end]
    return blk[:, :, 0].transpose(0, 1), blk[:, :, 1].transpose(0, 1)


class _Docs:
    """Packed documents: masks for the blocks of one rank (positions from the layout, ids on the device)."""

    def __init__(self, docs: PackedDocuments, causal: bool, zigzag: bool):
        self.docs, self.causal, self.zigzag = docs, causal, zigzag
        size, s, device = docs.world, docs.s_local, docs.token_positions.device
        self.q_pos = docs.token_positions  # [s]
        # Positions of the gathered keys: global order for causal zigzag (reordered), else rank-major.
        self.k_pos = (torch.arange(s * size, device=device) if zigzag
                      else rank_major_positions(size, s, docs.layout, device))

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, name: tuple) -> DocumentMask:
        ids = (self.docs.ids_at(pos) for pos in (q_pos, k_pos))  # searchsorted: no sync
        # Positions and ids: no [sq, sk] tensor; named per batch, so the GPU branch's block mask is built once.
        return DocumentMask(q_pos, k_pos, *ids, self.causal, (self.docs, ("allgather", self.zigzag, *name)))

    def diagonal(self, n: int) -> DocumentMask:
        """`[n*b, c, c]`: each local chunk against itself, stacked like `_diag`."""
        return DocumentMask.cat([self._mask(p, p, ("diag", i)) for i, p in enumerate(self.q_pos.chunk(n))])

    def remote(self, rows: slice, start: int, end: int) -> DocumentMask:
        """`[b, rows, end-start]`: local query rows against gathered keys [start, end)."""
        return self._mask(self.q_pos[rows], self.k_pos[start:end], ("remote", rows.start, rows.stop, start, end))


def _fwd(q, k, v, causal, scale, mask):
    """Local attention of a block: the dispatch, or under a document mask."""
    if mask is None:
        return attention_forward(q, k, v, causal, scale)
    return varlen_attention_forward(q, k, v, mask, scale)


def _bwd(do, q, k, v, o, lse, causal, scale, mask):
    if mask is None:
        return attention_backward(do, q, k, v, o, lse, causal, scale)
    return varlen_attention_backward(do, q, k, v, o, lse, mask, scale)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, packed, window=None):
        size, rank = comm.group_size(group), comm.group_rank(group)
        s = q.shape[1]
        zigzag = _zigzag(size, causal, layout)
        n = 2 if zigzag else 1
        docs = None if packed is None else _Docs(packed, causal, zigzag)
        win = None if window is None else window_blocks.WindowBlocks(rank, size, s, layout, window, q.shape[0],
                                                                     packed, q.device)
        with comm.comm_tag("allgather.fwd"):
            pending = comm.all_gather(_pack_kv(k, v), group, async_op=True) if size > 1 else None
        # While K/V travel: the rank's own (diagonal) blocks.
        o_d, lse_d = _fwd(_diag(q, n), _diag(k, n), _diag(v, n), causal, scale,
                          win.diagonal(n) if win else docs and docs.diagonal(n))
        out = _undiag(o_d, n).to(compute_dtype(q.dtype))  # [b, s, h, d]
        lse = _undiag(lse_d, n, dim=2).to(out.dtype)  # [b, h, s]
        if size > 1:
            kv = _gathered(pending, size, zigzag)
            for rows, start, end in _remote_blocks(rank, size, s, causal, layout):
                mask = docs and docs.remote(rows, start, end)
                if win and (blk := win.remote(rows, start, end)) is None:
                    continue  # wholly outside the window: skipped
                if win:
                    rows, start, end, mask = blk
                kb, vb = _keys(kv, start, end)
                o_b, lse_b = _fwd(q[:, rows], kb, vb, False, scale, mask)
                merge_attention(out[:, rows], lse[:, :, rows], o_b, lse_b)
            del kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.layout, ctx.packed = group, causal, scale, layout, packed
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale = ctx.group, ctx.causal, ctx.scale
        size, rank = comm.group_size(group), comm.group_rank(group)
        s = q.shape[1]
        zigzag = _zigzag(size, causal, ctx.layout)
        n = 2 if zigzag else 1
        docs = None if ctx.packed is None else _Docs(ctx.packed, causal, zigzag)
        win = None if ctx.window is None else window_blocks.WindowBlocks(rank, size, s, ctx.layout, ctx.window,
                                                                         q.shape[0], ctx.packed, q.device)
        do = do.contiguous()
        with comm.comm_tag("allgather.bwd"):
            # Re-gather (nothing full-length is kept from forward).
            pending = comm.all_gather(_pack_kv(k, v), group, async_op=True) if size > 1 else None
        # While K/V travel: gradients of the diagonal blocks, with the final merged (out, lse).
        dq_d, dk_d, dv_d = _bwd(_diag(do, n), _diag(q, n), _diag(k, n), _diag(v, n), _diag(out, n),
                                _diag(lse.transpose(1, 2), n).transpose(1, 2), causal, scale,
                                win.diagonal(n) if win else docs and docs.diagonal(n))
        acc = compute_dtype(q.dtype)
        dq, dk, dv = (_undiag(x, n).to(acc) for x in (dq_d, dk_d, dv_d))
        if size > 1:
            kv = _gathered(pending, size, zigzag)
            # The full-length dK/dV buffer and its reduce-scatter are in the activations' dtype (half the bytes of
            # float32 for bf16); each key's block contributions (at most two: the zigzag halves) are added in
            # float32 and rounded once.
            dkv = torch.zeros(kv.shape, dtype=kv.dtype, device=kv.device)  # [S, b, 2, h_kv, d]
            for rows, start, end in _remote_blocks(rank, size, s, causal, ctx.layout):
                mask = docs and docs.remote(rows, start, end)
                if win and (blk := win.remote(rows, start, end)) is None:
                    continue
                if win:
                    rows, start, end, mask = blk
                kb, vb = _keys(kv, start, end)
                dq_b, dk_b, dv_b = _bwd(do[:, rows], q[:, rows], kb, vb, out[:, rows], lse[:, :, rows], False, scale,
                                        mask)
                dq[:, rows] += dq_b
                blk = torch.stack([dk_b, dv_b], dim=2).transpose(0, 1)  # [end-start, b, 2, h_kv, d]
                dkv[start:end] = (dkv[start:end].to(acc) + blk.to(acc)).to(dkv.dtype)
                del blk
            del kv
            if zigzag:
                # Back to rank-major order for the reduce-scatter (inverse of the forward's permutation).
                chunks = dkv.view(2 * size, s // 2, *dkv.shape[1:])
                dkv = torch.empty_like(chunks).index_copy_(0, _zigzag_order(size, dkv.device), chunks).flatten(0, 1)
            with comm.comm_tag("allgather.bwd"):
                dkv = comm.reduce_scatter(dkv, group)  # [s, b, 2, h_kv, d]: this rank's keys, summed over ranks
            dk = dk + dkv[:, :, 0].transpose(0, 1)
            dv = dv + dkv[:, :, 1].transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


@torch.compiler.disable
def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None = None,
                        causal: bool = True, softmax_scale: float | None = None,
                        layout: Layout = "zigzag",
                        cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                        window: int | None = None) -> torch.Tensor:
    """Exact softmax attention over the CP-sharded sequence with one K/V all-gather (one dK/dV reduce-scatter).

    Args:
        q: this rank's queries `[b, s_local, h, d]`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`, `h % h_kv == 0`.
        group: the CP group (default: the mesh's CP group, else the world).
        causal: causal mask over global positions.
        softmax_scale: default 1/sqrt(d).
        layout: how the sequence was sharded ("zigzag" or "contiguous").
        cu_seqlens: packed documents (int `[n_docs + 1]`, global boundaries of the un-sharded `batch * seq`
            tokens, the same on every rank, on q's device), or the batch's `lctrain.sp.documents.PackedDocuments`:
            attention stays within a document (every block above
            under a document mask, `lctrain.ops.attention_varlen`; same blocks, collectives and overlap).
        window: a sliding window W (causal only): query i sees keys i - W < j <= i. The same collectives; remote
            blocks wholly outside the window are skipped and the rest cut to its visible box
            (`lctrain.sp.window_blocks`). `halo_attention` moves only the window's keys.
    Returns:
        This rank's output `[b, s_local, h, d]`.

    Communication: forward one all-gather of the packed K/V; backward one all-gather of them again and one
    reduce-scatter of dK/dV. Saved for backward: q, k, v, o, lse of this rank (O(S/P)).
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("allgather_attention", q, k, v, group, causal, layout, scale, cu_seqlens=cu_seqlens,
                 extra=lambda *_: window_blocks.window_problem(window, causal))
    docs = None if cu_seqlens is None else as_documents(cu_seqlens, q, comm.group_rank(group),
                                                        comm.group_size(group), layout)
    return _AllGatherAttention.apply(q, k, v, group, causal, scale, layout, docs, window)
