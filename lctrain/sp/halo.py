"""Halo attention: sliding-window softmax attention over a CP-sharded sequence by a halo exchange.

Query i sees keys i - W < j <= i (within its document when packed). The sequence is cut into G chunks of c
tokens (G = P contiguous, rank r holds chunk r; G = 2P zigzag, rank r holds chunks r and 2P-1-r). Chunk g needs,
besides its own keys, only the H_g = min(W - 1, g c) keys that precede it: the tails of chunks g-1, ..., g-C,
C = ceil((W - 1) / c) (no more than the chunks that exist). Each rank therefore

- forward: posts ONE batch of point-to-point transfers (one packed K/V buffer per peer, all pieces for that peer
  concatenated; a piece whose chunk the rank holds itself is a local copy), computes each chunk against itself
  (the band: flash-attn's `window_size` on GPU when installed, else a `DocumentMask` window: FlexAttention on GPU,
  the masked form on CPU) while the halo is in flight, then its
  first min(c, W - 1) queries against the halo, merged by log-sum-exp. The halo is kept for backward (O(W)).
- backward: computes the halo blocks' gradients first, posts the halo's dK/dV back to their owners along the same
  pieces (reverse direction), and differentiates the diagonal blocks while they travel.

Bytes per rank and direction: sum of the pieces it sends, at most n_chunks * (W - 1) * 2 * b * h_kv * d elements:
independent of the sequence length and of CP (tests/sp/test_halo.py measures it). K/V travel with their own
kv_heads (GQA is never expanded on the wire). Causal only (a window looks back); `causal=False` is an error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lctrain.ops.attention_varlen import DocumentMask, document_ids
from lctrain.ops.attention_window import (band_attention_backward, band_attention_forward, window_attention_backward,
                                          window_attention_forward, window_mask)
from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import Layout
from lctrain.sp.utils import check_inputs, compute_dtype, merge_attention, resolve_scale


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which rows to whom, for one rank (host ints, the same for every call of a signature).

    `slots`: the global chunk index of each of the rank's chunks. `halo_len[m]`: H of slot m. `local`: copies
    (dst slot, halo offset, src slot, src row start, length). `recv[peer]` / `send[peer]`: the pieces of the one
    buffer exchanged with `peer`, in (destination chunk, source chunk) order: (slot, halo offset or row start,
    length).
    """

    chunk: int
    slots: tuple[int, ...]
    halo_len: tuple[int, ...]
    local: tuple[tuple[int, int, int, int, int], ...]
    recv: tuple[tuple[int, tuple[tuple[int, int, int], ...]], ...]
    send: tuple[tuple[int, tuple[tuple[int, int, int], ...]], ...]

    def sent_rows(self) -> int:
        """Tokens this rank puts on the wire per direction (K and V of each)."""
        return sum(n for _, pieces in self.send for _, _, n in pieces)

    def received_rows(self) -> int:
        """Tokens this rank receives per direction (its halo rows held by other ranks)."""
        return sum(n for _, pieces in self.recv for _, _, n in pieces)


def _slots(rank: int, world: int, layout: str) -> tuple[int, ...]:
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" and world > 1 else (rank,)


@functools.lru_cache(maxsize=256)
def halo_plan(rank: int, world: int, s_local: int, window: int, layout: str) -> HaloPlan:
    """The halo exchange of rank `rank` (see :class:`HaloPlan`)."""
    n_loc = len(_slots(rank, world, layout))
    c = s_local // n_loc
    holder, slot_of = {}, {}
    for r in range(world):
        for m, g in enumerate(_slots(r, world, layout)):
            holder[g], slot_of[g] = r, m
    num = n_loc * world
    own = _slots(rank, world, layout)

    def pieces(g: int) -> list[tuple[int, int, int, int]]:
        """(source chunk j, row start in j, length, offset in g's halo) for the halo of chunk g."""
        h = min(window - 1, g * c)
        start = g * c - h
        out = []
        for j in range(g - 1, -1, -1):
            lo, hi = max(j * c, start), (j + 1) * c
            if lo >= hi:
                break
            out.append((j, lo - j * c, hi - lo, lo - start))
        return sorted(out)

    local, recv, send = [], {}, {}
    for g in range(num):
        for j, row, n, off in pieces(g):
            src, dst = holder[j], holder[g]
            if src == rank and dst == rank:
                local.append((slot_of[g], off, slot_of[j], row, n))
            elif dst == rank:
                recv.setdefault(src, []).append((slot_of[g], off, n))
            elif src == rank:
                send.setdefault(dst, []).append((slot_of[j], row, n))
    return HaloPlan(c, own, tuple(min(window - 1, g * c) for g in own), tuple(local),
                    tuple((p, tuple(v)) for p, v in sorted(recv.items())),
                    tuple((p, tuple(v)) for p, v in sorted(send.items())))


def _rows(x: torch.Tensor, plan: HaloPlan, slot: int, row: int, n: int) -> torch.Tensor:
    """Rows [row, row + n) of chunk `slot` of a `[2, b, s, h_kv, d]` buffer."""
    return x[:, :, slot * plan.chunk + row: slot * plan.chunk + row + n]


def _exchange(plan: HaloPlan, outgoing: dict[int, torch.Tensor], incoming_shape: tuple, dtype: torch.dtype,
              device: torch.device, recv_from, group) -> tuple[dict[int, torch.Tensor], comm.P2PHandle | None]:
    """Post every send in `outgoing` and a receive of `n` rows from each (peer, n) of `recv_from`, in one batch."""
    ops, incoming = [], {}
    for peer, n in recv_from:
        incoming[peer] = torch.empty(incoming_shape[:2] + (n,) + incoming_shape[3:], dtype=dtype, device=device)
        ops.append(P2POp("recv", incoming[peer], peer))
    ops += [P2POp("send", buf, peer) for peer, buf in outgoing.items()]
    return incoming, (comm.batch_isend_irecv(ops, group) if ops else None)


class _Docs:
    """Packed documents: document ids of a rank's chunks and halos (searchsorted on the device, no host sync)."""

    def __init__(self, cu_seqlens: torch.Tensor, plan: HaloPlan, b: int, total: int, device: torch.device):
        # A `PackedDocuments` (lctrain.sp.documents) carries the boundaries tensor too.
        self.cu, self.b, self.total = getattr(cu_seqlens, "cu_seqlens", cu_seqlens), b, total
        # The batch's document object names its block masks (one BlockMask per batch and block on the GPU branch).
        self.owner = cu_seqlens if hasattr(cu_seqlens, "cu_seqlens") else None

    def _ids(self, pos: torch.Tensor) -> torch.Tensor:
        return document_ids(self.cu, self.b, self.total, pos)


def _mask(plan: HaloPlan, slot: int, rows: int, halo: bool, window: int, docs: _Docs | None,
          device: torch.device) -> DocumentMask:
    """The window (and document) mask of slot `slot`'s first `rows` queries against its halo or its own chunk."""
    g, c = plan.slots[slot], plan.chunk
    q_pos = torch.arange(g * c, g * c + rows, device=device)
    k_pos = (torch.arange(g * c - plan.halo_len[slot], g * c, device=device) if halo
             else torch.arange(g * c, (g + 1) * c, device=device))
    if docs is None:
        return window_mask(q_pos, k_pos, window)
    key = None if docs.owner is None else (docs.owner, ("halo", slot, rows, halo))
    return window_mask(q_pos, k_pos, window, docs._ids(q_pos), docs._ids(k_pos), key)


def _halo_rows(plan: HaloPlan, slot: int, window: int) -> int:
    """Queries of a chunk that can see its halo: the first min(c, W - 1) (0 without a halo)."""
    return min(plan.chunk, window - 1) if plan.halo_len[slot] else 0


def _forward(q, k, v, group, window, scale, layout, cu_seqlens):
    world, rank = comm.group_size(group), comm.group_rank(group)
    b, s, h, d = q.shape
    plan = halo_plan(rank, world, s, window, layout)
    c = plan.chunk
    kv = torch.stack([k, v])  # [2, b, s, h_kv, d]: one buffer per transfer
    outgoing = {peer: torch.cat([_rows(kv, plan, m, row, n) for m, row, n in pieces], dim=2)
                for peer, pieces in plan.send}
    incoming, handle = _exchange(plan, outgoing, kv.shape, kv.dtype, kv.device,
                                 [(p, sum(n for *_, n in pcs)) for p, pcs in plan.recv], group)
    docs = None if cu_seqlens is None else _Docs(cu_seqlens, plan, b, s * world, q.device)
    acc = compute_dtype(q.dtype)
    out = torch.empty(b, s, h, d, dtype=acc, device=q.device)
    lse = torch.empty(b, h, s, dtype=acc, device=q.device)
    # While the halo travels: every chunk against itself (the band of its diagonal block).
    for m in range(len(plan.slots)):
        rows = slice(m * c, (m + 1) * c)
        if docs is None:
            o_b, lse_b = band_attention_forward(q[:, rows], k[:, rows], v[:, rows], window - 1, 0, scale)
        else:
            o_b, lse_b = window_attention_forward(q[:, rows], k[:, rows], v[:, rows],
                                                  _mask(plan, m, c, False, window, docs, q.device), scale)
        out[:, rows] = o_b.to(acc)
        lse[:, :, rows] = lse_b.to(acc)
    halo = [torch.empty(2, b, hl, *kv.shape[3:], dtype=kv.dtype, device=kv.device) for hl in plan.halo_len]
    for dst, off, src, row, n in plan.local:
        halo[dst][:, :, off:off + n] = _rows(kv, plan, src, row, n)
    if handle is not None:
        handle.wait()
    for peer, pieces in plan.recv:
        at = 0
        for m, off, n in pieces:
            halo[m][:, :, off:off + n] = incoming[peer][:, :, at:at + n]
            at += n
    for m in range(len(plan.slots)):
        if (nq := _halo_rows(plan, m, window)) == 0:
            continue
        rows = slice(m * c, m * c + nq)
        if docs is None:  # query i of the chunk sees halo keys [i + H - W + 1, i + H]: a band (W - 1 - nq, nq)
            o_b, lse_b = band_attention_forward(q[:, rows], halo[m][0], halo[m][1], window - 1 - nq, nq, scale)
        else:
            o_b, lse_b = window_attention_forward(q[:, rows], halo[m][0], halo[m][1],
                                                  _mask(plan, m, nq, True, window, docs, q.device), scale)
        merge_attention(out[:, rows], lse[:, :, rows], o_b, lse_b)
    return out.to(q.dtype), lse, halo


def _backward(do, q, k, v, out, lse, halo, group, window, scale, layout, cu_seqlens):
    world, rank = comm.group_size(group), comm.group_rank(group)
    b, s, h, d = q.shape
    plan = halo_plan(rank, world, s, window, layout)
    c = plan.chunk
    acc = compute_dtype(q.dtype)
    docs = None if cu_seqlens is None else _Docs(cu_seqlens, plan, b, s * world, q.device)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros((2,) + tuple(k.shape), dtype=acc, device=q.device)  # [2, b, s, h_kv, d]
    # The halo blocks first: their dK/dV go back to the owners while the diagonal blocks are differentiated.
    dhalo = [torch.zeros(hb.shape, dtype=acc, device=q.device) for hb in halo]
    for m in range(len(plan.slots)):
        if (nq := _halo_rows(plan, m, window)) == 0:
            continue
        rows = slice(m * c, m * c + nq)
        if docs is None:
            dq_b, dk_b, dv_b = band_attention_backward(do[:, rows], q[:, rows], halo[m][0], halo[m][1], out[:, rows],
                                                       lse[:, :, rows], window - 1 - nq, nq, scale)
        else:
            dq_b, dk_b, dv_b = window_attention_backward(do[:, rows], q[:, rows], halo[m][0], halo[m][1],
                                                         out[:, rows], lse[:, :, rows],
                                                         _mask(plan, m, nq, True, window, docs, q.device), scale)
        dq[:, rows] += dq_b
        dhalo[m][0] += dk_b
        dhalo[m][1] += dv_b
    # Reverse of forward: what we received, we send back (same pieces, same order); what we sent comes back.
    outgoing = {peer: torch.cat([dhalo[m][:, :, off:off + n] for m, off, n in pieces], dim=2)
                for peer, pieces in plan.recv}
    incoming, handle = _exchange(plan, outgoing, dkv.shape, acc, q.device,
                                 [(p, sum(n for *_, n in pcs)) for p, pcs in plan.send], group)
    for dst, off, src, row, n in plan.local:
        _rows(dkv, plan, src, row, n).add_(dhalo[dst][:, :, off:off + n])
    for m in range(len(plan.slots)):
        rows = slice(m * c, (m + 1) * c)
        if docs is None:
            grads = band_attention_backward(do[:, rows], q[:, rows], k[:, rows], v[:, rows], out[:, rows],
                                            lse[:, :, rows], window - 1, 0, scale)
        else:
            grads = window_attention_backward(do[:, rows], q[:, rows], k[:, rows], v[:, rows], out[:, rows],
                                              lse[:, :, rows], _mask(plan, m, c, False, window, docs, q.device),
                                              scale)
        dq[:, rows] += grads[0]
        dkv[0][:, rows] += grads[1]
        dkv[1][:, rows] += grads[2]
    if handle is not None:
        handle.wait()
    for peer, pieces in plan.send:
        at = 0
        for m, row, n in pieces:
            _rows(dkv, plan, m, row, n).add_(incoming[peer][:, :, at:at + n])
            at += n
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, window, scale, layout, cu_seqlens):
        with comm.comm_tag("halo.fwd"):
            out, lse, halo = _forward(q, k, v, group, window, scale, layout, cu_seqlens)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, *halo)
        ctx.group, ctx.window, ctx.scale, ctx.layout = group, window, scale, layout
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens, *halo = ctx.saved_tensors
        with comm.comm_tag("halo.bwd"):
            dq, dk, dv = _backward(do.contiguous(), q, k, v, out, lse, halo, ctx.group, ctx.window, ctx.scale,
                                   ctx.layout, cu_seqlens)
        return dq, dk, dv, None, None, None, None, None


def _window_problem(window: object, causal: bool):
    def check(q, k, v, cp) -> str | None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            return f"window must be a positive int (query i sees keys i - W < j <= i), got {window!r}"
        if not causal:
            return "halo_attention is causal (a sliding window looks back); pass causal=True"
        return None
    return check


@torch.compiler.disable
def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                   group: dist.ProcessGroup | None = None, layout: Layout = "contiguous", causal: bool = True,
                   cu_seqlens: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """Exact sliding-window softmax attention over the CP-sharded sequence, exchanging only the W - 1 keys/values
    that precede each local chunk.

    Args:
        q: this rank's queries `[b, s_local, h, d]`.
        k, v: this rank's keys and values `[b, s_local, h_kv, d]`, `h % h_kv == 0`.
        window: W >= 1: query i sees keys i - W < j <= i (W = 1: itself only; W >= the sequence: causal attention).
        group: the CP group (default: the mesh's CP group, else the world).
        layout: how the sequence was sharded ("zigzag" or "contiguous").
        causal: must be True.
        cu_seqlens: packed documents (int `[n_docs + 1]`, global boundaries of the un-sharded `batch * seq`
            tokens, the same on every rank, on q's device): the window stays within a document.
        softmax_scale: default 1/sqrt(d).
    Returns:
        This rank's output `[b, s_local, h, d]`.

    Communication: forward one batch of sends (one K/V buffer per peer holding the preceding chunks' tails), at
    most n_chunks * (W - 1) tokens of K and V per rank; backward the same bytes of dK/dV in the reverse direction.
    Saved for backward: q, k, v, o, lse and the received halo (O(S/P + W)).
    """
    group = cp_group_or_default(group)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    check_inputs("halo_attention", q, k, v, group, causal, layout, scale, extra=_window_problem(window, causal),
                 cu_seqlens=cu_seqlens)
    return _HaloAttention.apply(q, k, v, group, window, scale, layout, cu_seqlens)
