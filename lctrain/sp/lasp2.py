"""LASP-2: sequence-parallel linear attention (with per-head decay) by ONE all-gather of memory states.

Each CP rank holds one chunk of C tokens (contiguous layout) or two (zigzag: chunks r and 2P-1-r of 2P).
For every chunk it holds it computes the chunk's memory state M_g = sum_s lambda^(C-1-s) k_s^T v_s
(`[b, h, dk, dv]`, float32, independent of the sequence length) and starts ONE asynchronous all-gather of
the M; while it is in flight the rank computes the intra-chunk causal term through the local backend
dispatch (it does not need the other chunks). Then it forms the state entering each of its chunks locally,

    S_g = sum_{j<g} lambda^(C (g-1-j)) M_j,

and adds the inter-chunk term (q_t lambda^(t+1)) S_g, a local einsum. It keeps for backward what LASP-1 keeps:
q, k, v, the decay and its own entering states S_g (not the gathered M, not the intra-chunk terms). The backward
pass forms the gradients dS_g of the entering states (one einsum), starts their all-gather (the second and
last collective) and, while it is in flight, recomputes the intra-chunk term and the rank's memory states and
differentiates them (fla's memory model: inputs kept, intra-chunk terms recomputed); then each chunk's
dM_j = sum_{g>j} lambda^(C (g-1-j)) dS_g is formed locally. Non-causal: o = q . (sum of all M). Derivation:
README_lasp2.md.

Activation checkpointing (non-reentrant): a checkpointed LASP-2 layer keeps nothing of its own and reruns its
forward once in backward (one more forward all-gather, tests/sp/test_lasp2_checkpoint.py).

Packed documents (`cu_seqlens=`) go through the chunk-map path of `lctrain.sp.lasp2_delta` (a -inf log gate at
document starts), still one all-gather each way.

`check_linear_sp_inputs` (shared with LASP-1) validates inputs on every rank before any collective, with
one agreement exchange per call signature (`lctrain.sp.utils.agree_once`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.chunk_recompute import differentiate_now
from lctrain.ops.debug import debug_checks_enabled
from lctrain.ops.linear_attention import check_linear_attention_inputs, linear_attention, memory_state
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.precision import fp32_by_design
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import LAYOUTS
from lctrain.sp.documents import PackedDocuments
from lctrain.sp.lasp2_delta import lasp2_chunk_map_attention
from lctrain.sp.lasp2_scan import check_scan
from lctrain.sp.utils import agree_once


def check_linear_sp_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           log_decay: torch.Tensor | None, group: dist.ProcessGroup | None, causal: bool,
                           layout: str) -> tuple[int, int]:
    """Validate the inputs of a linear-attention SP call on every rank of `group`, before any collective.

    Local problems (shapes, decay without causal, a zigzag slice of odd length; decay values > 0 only with
    debug checks on, see `lctrain.ops.debug`) and differences between ranks (shapes, dtype, decay or not,
    mode) are exchanged once per signature (`agree_once`), so every rank raises the same ValueError instead
    of some ranks hanging. With debug checks on, the exchange runs on every call (values may change).

    Returns:
        (this rank, group size).
    """
    rank, world = comm.group_rank(group), comm.group_size(group)
    problem = None
    try:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown CP layout {layout!r}; expected one of {LAYOUTS}")
        check_linear_attention_inputs(q, k, v, log_decay)
        if log_decay is not None and not causal:
            raise ValueError("a decay (log_decay) is only defined for causal linear attention; pass causal=True "
                             "or log_decay=None")
        if q.shape[1] == 0:
            raise ValueError("this rank holds an empty sequence slice")
    except ValueError as err:
        problem = str(err)
    if problem is None and layout == "zigzag" and q.shape[1] % 2:
        problem = (f"sequence length {q.shape[1] * world} is not divisible by 2*CP = {2 * world} (zigzag layout: "
                   f"this rank's slice has odd length {q.shape[1]})")
    fields = (("q shape", tuple(q.shape)), ("k shape", tuple(k.shape)), ("v shape", tuple(v.shape)),
              ("dtype", str(q.dtype)), ("device", q.device.type), ("causal", bool(causal)), ("layout", layout),
              ("decay", None if log_decay is None else (tuple(log_decay.shape), str(log_decay.dtype))))

    def hint(values: list[tuple]) -> str:
        lens = [val[0][1] if len(val[0]) > 1 else None for val in values]
        if len(set(lens)) == 1:
            return ""
        parts = 2 if layout == "zigzag" else 1
        return (f" (sequence lengths per rank {lens}: the full sequence must split evenly, i.e. be divisible by "
                f"{'2*CP' if parts == 2 else 'CP'} = {parts * world})")

    agree_once(name, group, problem, fields, (q, k, v), cache=not debug_checks_enabled(), hint=hint)
    return rank, world


def _chunk_gids(rank: torch.Tensor | int, world: int, n_loc: int, device: torch.device) -> torch.Tensor:
    """Global chunk index of slot `m % n_loc` of rank `rank` (a tensor of ranks, or one rank), device math only."""
    slot = torch.arange(n_loc, device=device)
    r = rank if isinstance(rank, torch.Tensor) else torch.full((n_loc,), rank, device=device)
    if n_loc == 1:
        return r.reshape(-1)
    # zigzag: slot 0 is chunk r, slot 1 is chunk 2P-1-r.
    return torch.where(slot % 2 == 0, r, 2 * world - 1 - r).reshape(-1)


def _all_gids(world: int, n_loc: int, device: torch.device) -> torch.Tensor:
    """Global chunk index of every entry of a rank-major all-gather of per-chunk states `[world*n_loc]`."""
    m = torch.arange(world * n_loc, device=device)
    r = m // n_loc
    if n_loc == 1:
        return r
    return torch.where(m % n_loc == 0, r, 2 * world - 1 - r)


def _prefix_weights(log_decay: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, chunk_len: int,
                    num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """W[a, c, h] = lambda_h^(C (rows[a]-1-cols[c])) if cols[c] < rows[a], else 0 (chunk cols[c] -> start of rows[a])."""
    steps = rows[:, None] - 1 - cols[None, :]  # [A, B]
    before = (steps >= 0).to(dtype)
    if log_decay is None:
        return before[..., None].expand(*steps.shape, num_heads)
    expo = (steps.clamp_min(0) * chunk_len).to(dtype)
    return torch.exp(expo[..., None] * log_decay.to(dtype)) * before[..., None]  # [A, B, h]


def _q_decay(log_decay: torch.Tensor | None, chunk_len: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor | None:
    """lambda^(i+1) for the chunk's positions i, `[C, h]` (None without decay)."""
    if log_decay is None:
        return None
    i = torch.arange(1, chunk_len + 1, device=device, dtype=dtype)
    return torch.exp(i[:, None] * log_decay.to(dtype)[None, :])


def _stack_chunks(x: torch.Tensor, n_loc: int) -> torch.Tensor:
    """`[b, n_loc*C, ...]` -> `[n_loc*b, C, ...]` (a rank's chunks side by side in the batch)."""
    return torch.cat(x.chunk(n_loc, dim=1), dim=0) if n_loc > 1 else x


def _unstack_chunks(x: torch.Tensor, n_loc: int) -> torch.Tensor:
    """Inverse of `_stack_chunks`."""
    return torch.cat(x.chunk(n_loc, dim=0), dim=1) if n_loc > 1 else x


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, causal, layout, rank, world):
        sdt = compute_dtype(q.dtype)
        n_loc = 2 if layout == "zigzag" and causal else 1
        ctx.group, ctx.causal, ctx.rank, ctx.world, ctx.n_loc = group, causal, rank, world, n_loc
        if not causal:
            mem = memory_state(k, v)[None]  # [1, b, h, dk, dv], every local token counts
            with comm.comm_tag("lasp2.fwd"):
                total = comm.all_gather(mem, group=group).sum(0)  # [b, h, dk, dv]
            ctx.save_for_backward(q, k, v, total)
            return torch.einsum("bshk,bhkv->bshv", q, total.to(q.dtype)).to(v.dtype)

        b, s, h, _ = q.shape
        chunk_len = s // n_loc
        qs, ks, vs = (_stack_chunks(x, n_loc) for x in (q, k, v))  # [n_loc*b, C, h, d]
        mem = memory_state(ks, vs, log_decay)  # [n_loc*b, h, dk, dv]
        with comm.comm_tag("lasp2.fwd"):
            pending = comm.all_gather(mem.view(n_loc, b, *mem.shape[1:]), group=group, async_op=True)
        o_intra, _ = linear_attention(qs, ks, vs, log_decay)  # overlaps the all-gather
        mem_all = pending.wait()  # [world*n_loc, b, h, dk, dv], rank-major
        own = _chunk_gids(rank, world, n_loc, q.device)
        weights = _prefix_weights(log_decay, own, _all_gids(world, n_loc, q.device), chunk_len, h, sdt)
        with fp32_by_design("LASP-2 prefix fold of the gathered chunk states (no sequence dimension)"):
            entering = torch.einsum("gjh,jbhkv->gbhkv", weights, mem_all).flatten(0, 1)  # [n_loc*b, h, dk, dv]
        del mem_all  # the gathered states are not kept: backward needs only this rank's entering states
        q_in = qs
        q_dec = _q_decay(log_decay, chunk_len, sdt, q.device)
        if q_dec is not None:
            q_in = (q_in.to(sdt) * q_dec[:, :, None]).to(q.dtype)  # decayed in float32, rounded for the matmul
        o = o_intra.to(sdt) + torch.einsum("bshk,bhkv->bshv", q_in, entering.to(q.dtype)).to(sdt)
        # Kept for backward: the inputs and this rank's entering states only (what LASP-1 keeps); the intra-chunk
        # terms and the memory states are recomputed there.
        ctx.save_for_backward(q, k, v, log_decay, entering)
        return _unstack_chunks(o, n_loc).to(v.dtype)

    @staticmethod
    def backward(ctx, do):
        group, rank, world, n_loc = ctx.group, ctx.rank, ctx.world, ctx.n_loc
        if not ctx.causal:
            q, k, v, total = ctx.saved_tensors
            sdt = total.dtype
            d_total = torch.einsum("bshk,bshv->bhkv", q, do.to(q.dtype)).to(sdt)[None]  # this rank's d(sum M)
            with comm.comm_tag("lasp2.bwd"):
                pending = comm.all_gather(d_total, group=group, async_op=True)
            idt = q.dtype
            dq = torch.einsum("bshv,bhkv->bshk", do.to(idt), total.to(idt))  # overlaps the all-gather
            d_mem = pending.wait().sum(0).to(idt)  # [b, h, dk, dv]
            dk = torch.einsum("bshv,bhkv->bshk", v, d_mem)
            dv = torch.einsum("bshk,bhkv->bshv", k, d_mem)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None

        q, k, v, log_decay, entering = ctx.saved_tensors
        decay_grad = bool(ctx.needs_input_grad[3])
        b, s, h, _ = q.shape
        chunk_len = s // n_loc
        sdt = entering.dtype
        dos = _stack_chunks(do, n_loc)  # [n_loc*b, C, h, dv]
        q_dec = _q_decay(log_decay, chunk_len, sdt, q.device)  # [C, h] or None
        qs, ks, vs = (_stack_chunks(x, n_loc) for x in (q, k, v))
        idt = q.dtype
        q_in = qs
        if q_dec is not None:
            q_in = (q_in.to(sdt) * q_dec[:, :, None]).to(idt)
        # dL/dS_g for this rank's chunks, from the inter-chunk term o += (q_t lambda^(t+1)) S_g.
        d_in = torch.einsum("bshk,bshv->bhkv", q_in, dos.to(idt)).to(sdt)  # [n_loc*b, h, dk, dv]
        with comm.comm_tag("lasp2.bwd"):
            pending = comm.all_gather(d_in.view(n_loc, b, *d_in.shape[1:]), group=group, async_op=True)

        # While the all-gather is in flight: recompute the intra-chunk term and the memory states, differentiate the
        # intra-chunk term, and form the inter dq.
        with torch.enable_grad(), differentiate_now():
            leaves = [x.detach().requires_grad_(True) for x in (qs, ks, vs)]
            ld = log_decay.detach().requires_grad_(True) if decay_grad else log_decay
            o_intra, _ = linear_attention(*leaves, ld)
            wrt = list(leaves) + ([ld] if decay_grad else [])
            grads = torch.autograd.grad(o_intra, wrt, dos.to(o_intra.dtype))
            del o_intra
            mem = memory_state(leaves[1], leaves[2], ld)  # [n_loc*b, h, dk, dv]
        dqs = grads[0].to(sdt)
        dq_raw = torch.einsum("bshv,bhkv->bshk", dos.to(idt), entering.to(idt)).to(sdt)  # d(q_in), inter term
        dqs = dqs + (dq_raw * q_dec[:, :, None] if q_dec is not None else dq_raw)
        d_ld = None
        if decay_grad:
            pos = torch.arange(1, chunk_len + 1, device=q.device, dtype=sdt)
            d_ld = grads[3].to(sdt) + ((q_in.to(sdt) * dq_raw).sum(-1) * pos[:, None]).sum((0, 1))  # no GEMM

        d_in_all = pending.wait()  # [world*n_loc, b, h, dk, dv], rank-major
        own = _chunk_gids(rank, world, n_loc, q.device)
        every = _all_gids(world, n_loc, q.device)
        # dM_j = sum_{g>j} W[g, j] dS_g for this rank's chunks j (a suffix sum over later chunks).
        w_back = _prefix_weights(log_decay, every, own, chunk_len, h, sdt)  # [G, n_loc, h]
        with fp32_by_design("LASP-2 suffix fold of the gathered state gradients (no sequence dimension)"):
            d_mem = torch.einsum("gjh,gbhkv->jbhkv", w_back, d_in_all).flatten(0, 1)  # [n_loc*b, h, dk, dv]
        mem_grads = torch.autograd.grad(mem, [leaves[1], leaves[2]] + ([ld] if decay_grad else []), d_mem)
        dks = grads[1].to(sdt) + mem_grads[0]
        dvs = grads[2].to(sdt) + mem_grads[1]
        if decay_grad:
            # The decay also enters through the prefix weights W[g, j] = lambda^(C (g-1-j)), dW/dlog(lambda) =
            # C (g-1-j) W. Every pair (g, j) is counted once in the group: on the rank that holds chunk j (its own
            # M_j, every rank's dS_g from the all-gather), so no gathered M is kept from forward.
            steps = ((every[:, None] - 1 - own[None, :]).clamp_min(0) * chunk_len).to(sdt)  # [G, n_loc]
            with fp32_by_design("LASP-2 decay gradient of the prefix weights (states only)"):
                d_w = torch.einsum("gbhkv,jbhkv->gjh", d_in_all, mem.detach().view(n_loc, b, *mem.shape[1:]))
            d_ld = (d_ld + mem_grads[2] + (d_w * w_back * steps[..., None]).sum((0, 1))).to(log_decay.dtype)
        dq, dk, dv = (_unstack_chunks(x, n_loc) for x in (dqs, dks, dvs))
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(do.dtype), d_ld, None, None, None, None, None


def lasp2_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                           group: dist.ProcessGroup | None = None, causal: bool = True,
                           layout: str = "contiguous",
                           cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                           scan: str = "allgather") -> torch.Tensor:
    """Linear attention over a sequence sharded across the CP group, exchanging only memory states (LASP-2).

    Args:
        q, k: `[b, s_local, h, dk]`, this rank's tokens (`shard_sequence(x, layout=layout)`).
        v: `[b, s_local, h, dv]`.
        log_decay: `[h]`, log(lambda) <= 0 per head (identical on every rank), or None (lambda = 1). When it
            requires grad, each rank returns its own contribution to the gradient; the sum over the CP group
            (which the DP x CP gradient reduction forms) is the gradient of the whole sequence's loss. Its
            values are not checked per call (that would synchronise the device): see `lctrain.ops.debug`.
            Data-dependent gates, sharded like q: `[b, s_local, h]` (a scalar per head and token: Mamba2 /
            simple GLA) or `[b, s_local, h, dk]` (GLA's vector gate), S_t = diag(exp(g_t)) S_(t-1) + k_t^T v_t;
            each chunk's cumulative decay then travels with its state in the same single all-gather
            (`lctrain.sp.lasp2_delta`, README_lasp2_gated.md; causal only).
        group: the CP group (default: the mesh's).
        causal: causal (with optional decay) or full non-causal linear attention (no decay).
        layout: "contiguous" (rank r holds chunk r of P) or "zigzag" (chunks r and 2P-1-r of 2P).
        cu_seqlens: packed documents (int `[n_docs + 1]` on q's device, the same on every rank: global
            boundaries of the un-sharded batch laid end to end, 0 ... b * seq_len, every sequence end a
            boundary; causal only), or the batch's `lctrain.sp.documents.PackedDocuments`: the state restarts at
            each document start, as a log gate -inf there added to
            the decay (`lctrain.sp.lasp2_delta.document_log_gate`), through the chunk-map path: still one
            all-gather each way. Values are checked only with debug checks on.
        scan: "allgather" (the states of every chunk in one all-gather each way) or "tree" (causal only: an
            exclusive prefix scan of the chunk maps in ceil(log2 CP) point-to-point rounds, each rank holding O(1)
            states, through the chunk-map path: `lctrain.sp.lasp2_scan`).
    Returns:
        `o` `[b, s_local, h, dv]` in v's dtype: this rank's rows of linear attention over the full sequence.

    Communication: one all-gather of `n_chunks * b * h * dk * dv` float32 per rank forward (n_chunks = 1
    contiguous, 2 zigzag), one of the same size backward, whatever the sequence length; each is issued
    asynchronously and overlapped with the intra-chunk compute. After the first call of a signature nothing
    else goes on the wire and nothing synchronises the host.
    """
    group = cp_group_or_default(group)
    if cu_seqlens is not None:
        vector = log_decay is not None and log_decay.dim() == 4
        problem = None if causal else "cu_seqlens (packed documents) needs causal=True"
        return lasp2_chunk_map_attention(q, k, v, log_decay, None, "vector" if vector else "scalar", group, layout,
                                         name="lasp2_linear_attention", tag="lasp2", cu_seqlens=cu_seqlens,
                                         problem=problem, scan=scan)
    if log_decay is not None and log_decay.dim() > 1:
        if not causal:
            raise ValueError("lasp2_linear_attention: a decay (log_decay) is only defined for causal linear "
                             "attention; pass causal=True or log_decay=None")
        return lasp2_chunk_map_attention(q, k, v, log_decay, None, "vector" if log_decay.dim() == 4 else "scalar",
                                         group, layout, name="lasp2_linear_attention", tag="lasp2", scan=scan)
    if scan != "allgather":
        # The tree scan folds chunk maps: a [h] decay (or none) is a scalar gate there.
        return lasp2_chunk_map_attention(q, k, v, log_decay, None, "scalar", group, layout,
                                         name="lasp2_linear_attention", tag="lasp2", scan=scan,
                                         problem=check_scan(scan, causal))
    rank, world = check_linear_sp_inputs("lasp2_linear_attention", q, k, v, log_decay, group, causal, layout)
    return _LASP2.apply(q, k, v, log_decay, group, causal, layout, rank, world)
