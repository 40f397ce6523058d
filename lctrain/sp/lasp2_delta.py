"""LASP-2 for recurrences whose chunks act on the state as affine maps: the gated delta rule and gated linear
attention with data-dependent gates, by ONE all-gather forward and ONE backward.

A chunk g of the sequence (C tokens), started from state S, leaves T_g S + M_g behind, where M_g is the state
it leaves from a zero start and T_g is the product of its per-token maps:

    scalar gate [b, s, h]      T_g = exp(sum of the chunk's log gates)             [b, h]
    vector gate [b, s, h, dk]  T_g = diag(exp(sum of the chunk's log gates))       [b, h, dk]
    gated delta rule           T_g = prod_t a_t (I - beta_t k_t k_t^T)              [b, h, dk, dk]

Forward: each rank computes (T, M) of its chunk(s) (`lctrain.ops.gla.gla_chunk_map`,
`lctrain.ops.gated_delta.gated_delta_chunk_map`), packs them into one buffer and all-gathers it (both zigzag
chunks in the same call); every rank then folds the prefix S_0 = S_init, S_(g+1) = T_g S_g + M_g locally in
float32 (float64 for float64 inputs) by a log-depth scan (`affine_scan`), keeps only its own entering states
S_g and chunk maps T_g (the gathered buffer is dropped), and runs its chunks from S_g through the local
backend dispatch (fla's kernels on GPU). Backward: the local pass is recomputed and gives D_g = dL/dS_g for the
rank's chunks; ONE all-gather of the D_g together with the rank's own T_g (plus, with output_final_state, each
rank's gradient of the final state) lets every rank fold the suffix Lambda_G = dL/dS_final,
Lambda_g = D_g + T_g^T Lambda_(g+1) locally (the same scan);
dL/dM_g = Lambda_(g+1) and dL/dT_g = Lambda_(g+1) S_g^T flow back through the rank's own chunk maps.
Derivation, byte counts and alternatives: README_lasp2_gated.md.

Packed documents (`cu_seqlens=`): the state restarts from zero at every document start. That is a transition
with gate a_t = 0, so the boundaries become a data-dependent log gate that is -inf at document starts
(`document_log_gate`, added to any given gate; the starts come from `lctrain.sp.documents`, built once per
batch or derived sync-free from a bare cu_seqlens) and everything above runs unchanged: a document may span any
number of ranks or chunks, the communication is the same one all-gather each way. -inf is exact here because
every exponent the plain-PyTorch forms take is a masked cumulative sum of gates, never a difference of two
(`lctrain.ops.gla.segment_log_decay`): exp(-inf) = 0 exactly and its gradient exp(x) dx = 0. fla's chunk
kernels do form differences G_i - G_j (-inf - -inf = NaN), so with documents the local pass uses the "chunk"
backend (`DOCUMENT_BACKEND`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.chunk_recompute import differentiate_now
from lctrain.ops.debug import debug_checks_enabled
from lctrain.ops.gated_delta import gated_delta_chunk_map, gated_delta_rule
from lctrain.ops.gla import check_gate_values, check_gated_inputs, gated_linear_attention, gla_chunk_map
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.precision import fp32_by_design
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import LAYOUTS, chunk_ids
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.sp.utils import agree_once, cu_seqlens_problem

#: The recurrences this module carries across ranks, by the shape of their chunk map's T.
VARIANTS = ("scalar", "vector", "delta")

#: The local backend used when a call has document resets (-inf log gates): the plain-PyTorch chunked form.
DOCUMENT_BACKEND = "chunk"


def document_log_gate(g: torch.Tensor | None, starts: torch.Tensor, q: torch.Tensor, vector: bool) -> torch.Tensor:
    """The log gate with document resets: -inf at document starts, else g (None -> 0, `[h]` broadcast).

    Returns `[b, s, h]` (or `[b, s, h, dk]` for a vector gate) in g's dtype (q's without g); differentiable in g,
    whose gradient at a reset is 0 (the gate does not act there).
    """
    b, s, h, dk = q.shape
    shape = (b, s, h, dk) if vector else (b, s, h)
    base = (torch.zeros(shape, dtype=q.dtype, device=q.device) if g is None else g.expand(shape))
    mask = starts[:, :, None, None] if vector else starts[:, :, None]
    return torch.where(mask, torch.full((), float("-inf"), dtype=base.dtype, device=base.device), base)


def check_chunk_map_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                           beta: torch.Tensor | None, initial_state: torch.Tensor | None, variant: str,
                           group: dist.ProcessGroup | None, layout: str, output_final_state: bool,
                           cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                           problem: str | None = None) -> tuple[int, int]:
    """Validate inputs before any collective; returns (rank, world).

    Shapes are checked on every call (host metadata, no sync); the ranks' agreement is exchanged once per call
    signature (`lctrain.sp.utils.agree_once`); data values (log gates finite and <= 0, beta in [0, 1]) only with
    debug checks on (`lctrain.ops.debug`), and then the exchange runs on every call.
    """
    rank, world = comm.group_rank(group), comm.group_size(group)
    debug = debug_checks_enabled()
    try:
        if problem is not None:
            raise ValueError(problem)
        if layout not in LAYOUTS:
            raise ValueError(f"unknown CP layout {layout!r}; expected one of {LAYOUTS}")
        kind = check_gated_inputs(q, k, v, g, beta if variant == "delta" else None, initial_state,
                                  delta=variant == "delta")
        if variant == "vector" and kind != "vector" or variant == "scalar" and kind not in ("scalar", "head", "none"):
            raise ValueError(f"a {variant} gate was expected, got log gate of shape "
                             f"{None if g is None else list(g.shape)}")
        if q.shape[1] == 0:
            raise ValueError("this rank holds an empty sequence slice")
        if layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"sequence length {q.shape[1] * world} is not divisible by 2*CP = {2 * world} "
                             f"(zigzag layout: this rank's slice has odd length {q.shape[1]})")
        if cu_seqlens is not None and initial_state is not None:
            raise ValueError("initial_state and cu_seqlens together are not supported (every document starts "
                             "from a zero state)")
        problem = cu_seqlens_problem(cu_seqlens, q, world, rank, layout)
        if problem is not None:
            raise ValueError(problem)
        if debug:
            check_gate_values(g, beta)
    except ValueError as err:
        problem = str(err)
    cu = cu_seqlens.cu_seqlens if isinstance(cu_seqlens, PackedDocuments) else cu_seqlens
    cu = cu if isinstance(cu, torch.Tensor) else None
    fields = (("q shape", tuple(q.shape)), ("v shape", tuple(v.shape)), ("dtype", str(q.dtype)),
              ("device", q.device.type), ("layout", layout), ("variant", variant),
              ("gate", None if g is None else (tuple(g.shape), str(g.dtype))),
              ("initial state", initial_state is not None), ("final state", bool(output_final_state)),
              ("cu_seqlens", None if cu is None else (tuple(cu.shape), str(cu.dtype))))

    def hint(values: list[tuple]) -> str:
        lens = [val[0][1] if len(val[0]) > 1 else None for val in values]
        if len(set(lens)) == 1:
            return ""
        return (f" (sequence lengths per rank {lens}: the full sequence must split evenly over "
                f"{'2*CP' if layout == 'zigzag' else 'CP'} chunks)")

    agree_once(name, group, problem, fields, (q, k, v), cache=not debug, hint=hint)
    return rank, world


def _stack(x: torch.Tensor | None, n_loc: int) -> torch.Tensor | None:
    """`[b, n_loc*C, ...]` -> `[n_loc*b, C, ...]`; a `[h]` gate (or None) is shared by every chunk."""
    if x is None or x.dim() == 1 or n_loc == 1:
        return x
    return torch.cat(x.chunk(n_loc, dim=1), dim=0)


def _unstack(x: torch.Tensor, n_loc: int) -> torch.Tensor:
    return torch.cat(x.chunk(n_loc, dim=0), dim=1) if n_loc > 1 else x


def _apply(t: torch.Tensor, s: torch.Tensor, variant: str, transpose: bool = False) -> torch.Tensor:
    """T S (or T^T S) for a state `[..., dk, dv]`."""
    if variant == "scalar":
        return t[..., None, None] * s
    if variant == "vector":
        return t[..., None] * s
    return (t.transpose(-1, -2) if transpose else t) @ s


def _compose(t_after: torch.Tensor, t_before: torch.Tensor, variant: str) -> torch.Tensor:
    """The T of (x -> t_after x) after (x -> t_before x)."""
    return t_after @ t_before if variant == "delta" else t_after * t_before


def affine_scan(t: torch.Tensor, m: torch.Tensor, start: torch.Tensor,
                variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The states entering and leaving a chain of affine maps x -> T_c x + M_c, c = 0 ... G-1, from `start`.

    A log-depth (Hillis-Steele) scan instead of G dependent steps: the maps compose associatively,
    (T2, M2) o (T1, M1) = (T2 T1, T2 M1 + M2), and ceil(log2 G) rounds of composing each map with the one
    `2^r` places before it give every prefix f_c o ... o f_0, applied once to `start`.

    Args:
        t: `[G, b, h]` (scalar), `[G, b, h, dk]` (vector) or `[G, b, h, dk, dk]` (delta).
        m: `[G, b, h, dk, dv]`.
        start: `[b, h, dk, dv]`, the state entering map 0.
    Returns:
        entering `[G, b, h, dk, dv]` (entering[c] is the state before map c) and the state after the last map.
    """
    with fp32_by_design("LASP-2 chunk-map prefix scan of states and [dk, dk] maps (no sequence dimension)"):
        span = 1
        while span < t.shape[0]:
            t, m = (torch.cat([t[:span], _compose(t[span:], t[:-span], variant)]),
                    torch.cat([m[:span], _apply(t[span:], m[:-span], variant) + m[span:]]))
            span *= 2
        after = _apply(t, start, variant) + m  # [G, b, h, dk, dv], the state after each map
        return torch.cat([start[None], after[:-1]]), after[-1]


def _chunk_map(variant: str, k, v, g, beta):
    if variant == "delta":
        return gated_delta_chunk_map(k, v, g, beta)
    return gla_chunk_map(k, v, g)


def _local(variant: str, q, k, v, g, beta, initial_state, backend: str | None = None):
    if variant == "delta":
        return gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, backend=backend)[0]
    return gated_linear_attention(q, k, v, g, initial_state=initial_state, backend=backend)[0]


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    return b if a is None else (a if b is None else a + b)


def _input_grads(grads, map_grads, n_loc: int, gs, bs, g, beta) -> tuple:
    """dq, dk, dv, d gate, d beta of a rank's chunks: the local pass's gradients (`grads`: q, k, v, then [4] the
    gate and beta when they require grad) plus the chunk maps' (`map_grads`: k, v, then the gate and beta)."""
    dq = _unstack(grads[0], n_loc)
    dk = _unstack(grads[1] + map_grads[0], n_loc)
    dv = _unstack(grads[2] + map_grads[1], n_loc)
    dg = dbeta = None
    i, j = 4, 2
    if gs is not None and gs.requires_grad:
        dg = _add(grads[i], map_grads[j]).to(g.dtype)
        i, j = i + 1, j + 1
    if bs is not None and bs.requires_grad:
        dbeta = _add(grads[i], map_grads[j]).to(beta.dtype)
    return dq, dk, dv, dg, dbeta


def _to_global_order(x: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Rank-major gathered chunks `[world * n_loc, ...]` -> global chunk order (views and a flip: no index tensor).

    zigzag: rank r's slots are chunks r and 2P-1-r, so the early chunks in rank order, then the late ones reversed.
    """
    if layout != "zigzag":
        return x
    per_rank = x.view(world, 2, *x.shape[1:])
    return torch.cat([per_rank[:, 0], per_rank[:, 1].flip(0)], dim=0)


class _LASP2ChunkMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, variant, group, layout, rank, world, tag, want_final,
                backend=None):
        ids = chunk_ids(rank, world, layout)
        n_loc, num_chunks = len(ids), len(ids) * world
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        sdt = compute_dtype(q.dtype)
        qs, ks, vs, gs, bs = (_stack(x, n_loc) for x in (q, k, v, g, beta))  # [n_loc*b, C, h, ...]
        state = (initial_state.to(sdt) if initial_state is not None
                 else torch.zeros(b, h, dk, dv, dtype=sdt, device=q.device))
        ctx.variant, ctx.group, ctx.layout, ctx.rank, ctx.world, ctx.tag = variant, group, layout, rank, world, tag
        ctx.has_initial, ctx.want_final, ctx.backend = initial_state is not None, want_final, backend
        # One chunk in all and no final state asked for: no chunk map is needed (one GPU / cp=1 runs).
        ctx.single = num_chunks == 1 and not want_final
        if ctx.single:
            o = _local(variant, qs, ks, vs, gs, bs, state, backend)
            ctx.save_for_backward(q, k, v, g, beta, state, None)
            return o, o.new_zeros(0)
        t_loc, m_loc = _chunk_map(variant, ks, vs, gs, bs)  # T [n_loc*b, h, ...], M [n_loc*b, h, dk, dv]
        t_shape = t_loc.shape[2:]
        # One buffer per rank: [n_loc, b, h, |T| + dk*dv] (T and M side by side), one all-gather.
        buf = torch.cat([t_loc.reshape(n_loc, b, h, -1), m_loc.reshape(n_loc, b, h, -1)], dim=-1).to(sdt)
        with comm.comm_tag(f"{tag}.fwd"):
            allbuf = _to_global_order(comm.all_gather(buf, group=group), world, layout)  # [G, b, h, |T| + dk*dv]
        t_all = allbuf[..., : -dk * dv].reshape(num_chunks, b, h, *t_shape)
        m_all = allbuf[..., -dk * dv:].reshape(num_chunks, b, h, dk, dv)
        del allbuf
        states, state = affine_scan(t_all, m_all, state, variant)  # prefix fold S_(c+1) = T_c S_c + M_c
        entering = torch.cat([states[c] for c in ids], dim=0)  # [n_loc*b, h, dk, dv]
        del t_all, m_all, states  # only this rank's entering states and own maps are kept for backward
        o = _local(variant, qs, ks, vs, gs, bs, entering, backend)
        ctx.save_for_backward(q, k, v, g, beta, entering, t_loc)
        return _unstack(o, n_loc), state

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, beta, entering, t_own = ctx.saved_tensors
        variant, group, layout, rank, world = ctx.variant, ctx.group, ctx.layout, ctx.rank, ctx.world
        ids = chunk_ids(rank, world, layout)
        n_loc, num_chunks = len(ids), len(ids) * world
        b = q.shape[0]
        need = ctx.needs_input_grad
        with torch.enable_grad(), differentiate_now():
            qs, ks, vs = (_stack(x, n_loc).detach().requires_grad_(True) for x in (q, k, v))
            gs = g.detach().requires_grad_(True) if g is not None and need[3] else g
            gs_loc = _stack(gs, n_loc)
            bs = beta.detach().requires_grad_(True) if beta is not None and need[4] else beta
            bs_loc = _stack(bs, n_loc)
            s_in = entering.detach().requires_grad_(True)
            o = _local(variant, qs, ks, vs, gs_loc, bs_loc, s_in, ctx.backend)
            leaves = [qs, ks, vs, s_in] + [x for x in (gs, bs) if x is not None and x.requires_grad]
            grads = list(torch.autograd.grad(o, leaves, _stack(do, n_loc), allow_unused=True))
        d_in = grads[3]  # [n_loc*b, h, dk, dv], D_g of this rank's chunks
        if ctx.single:
            # One chunk, no final state: nothing flows through a chunk map; dL/dS_init = D_0.
            dg = grads[4].to(g.dtype) if gs is not None and gs.requires_grad else None
            dbeta = grads[-1].to(beta.dtype) if bs is not None and bs.requires_grad else None
            d_init = d_in if ctx.has_initial and need[5] else None
            return (grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), dg, dbeta, d_init,
                    None, None, None, None, None, None, None, None)
        # One all-gather: the rank's D_g, its own chunk maps' T (re-gathered rather than kept from forward: the
        # suffix fold needs every later chunk's T) and, with output_final_state, its share of dL/dS_final.
        parts = [d_in, t_own.to(d_in.dtype)] + ([d_final.to(d_in.dtype)] if ctx.want_final else [])
        sizes = [x.numel() for x in parts]
        buf = torch.cat([x.reshape(-1) for x in parts])
        with comm.comm_tag(f"{ctx.tag}.bwd"):
            pending = comm.all_gather(buf, group=group, async_op=True)  # [world * sum(sizes)]
        with torch.enable_grad():
            # While the all-gather is in flight: the rank's own chunk maps S_out = T S_in + M under autograd
            # (S_in held fixed: its gradient is Lambda, formed below).
            t_loc, m_loc = _chunk_map(variant, ks, vs, gs_loc, bs_loc)
            with fp32_by_design("LASP-2 chunk map applied to the entering state (no sequence dimension)"):
                leaving = _apply(t_loc, entering, variant) + m_loc
        per_rank = pending.wait().view(world, -1).split(sizes, dim=1)
        d_all = _to_global_order(per_rank[0].reshape(world * n_loc, b, *d_in.shape[1:]), world, layout)
        t_all = _to_global_order(per_rank[1].reshape(world * n_loc, b, *t_own.shape[1:]), world, layout)
        # Lambda_G = dL/dS_final: the sum of every rank's share (zero without output_final_state).
        lam = (per_rank[2].sum(0).view_as(d_final) if ctx.want_final else torch.zeros_like(d_all[0]))
        # Suffix fold Lambda_c = D_c + T_c^T Lambda_(c+1): the same scan over the reversed chain of transposed maps.
        t_rev = t_all.flip(0).transpose(-1, -2) if variant == "delta" else t_all.flip(0)
        after_rev, lam = affine_scan(t_rev, d_all.flip(0), lam.to(d_all.dtype), variant)
        after = after_rev.flip(0)  # after[c] = Lambda_(c+1) = dL/d(state leaving chunk c); lam = Lambda_0
        lam_own = torch.cat([after[c] for c in ids], dim=0)  # dL/d(state leaving each own chunk)
        map_leaves = [ks, vs] + [x for x in (gs, bs) if x is not None and x.requires_grad]
        map_grads = torch.autograd.grad(leaving, map_leaves, lam_own, allow_unused=True)
        dq, dk, dv, dg, dbeta = _input_grads(grads, map_grads, n_loc, gs, bs, g, beta)
        d_init = None
        if ctx.has_initial and need[5]:
            # The initial state is replicated: CP rank 0 (which holds the first chunk) returns the whole gradient.
            d_init = lam if rank == 0 else torch.zeros_like(lam)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dbeta, d_init,
                None, None, None, None, None, None, None, None)


def lasp2_chunk_map_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                              beta: torch.Tensor | None, variant: str, group: dist.ProcessGroup | None = None,
                              layout: str = "contiguous", initial_state: torch.Tensor | None = None,
                              output_final_state: bool = False, name: str = "lasp2",
                              tag: str = "lasp2", cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                              problem: str | None = None,
                              scan: str = "allgather") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LASP-2 for a recurrence given by its chunk maps (`variant`: "scalar", "vector" or "delta").

    The public entry points are `lasp2_delta_attention` and `lasp2_linear_attention` (data-dependent gates);
    arguments and results as there. Collectives are tagged `{tag}.fwd` and `{tag}.bwd`. `problem`: a ValueError
    message the caller found, raised on every rank through the same agreement exchange. `scan="tree"`: the fold
    by a log-depth scan of the chunk maps (`lctrain.sp.lasp2_scan`) instead of the all-gather.
    """
    from lctrain.sp.lasp2_scan import LASP2TreeScan, check_scan

    problem = problem or check_scan(scan)
    if variant not in VARIANTS:
        raise ValueError(f"unknown chunk-map variant {variant!r}; expected one of {VARIANTS}")
    group = cp_group_or_default(group)
    rank, world = check_chunk_map_inputs(name, q, k, v, g, beta, initial_state, variant, group, layout,
                                         output_final_state, cu_seqlens, problem)
    backend = None
    if cu_seqlens is not None:
        starts = as_documents(cu_seqlens, q, rank, world, layout).starts  # [b, s_local], no sync
        g = document_log_gate(g, starts, q, variant == "vector")
        backend = DOCUMENT_BACKEND
    fold = LASP2TreeScan if scan == "tree" else _LASP2ChunkMap
    o, final = fold.apply(q, k, v, g, beta, initial_state, variant, group, layout, rank, world, tag,
                          bool(output_final_state), backend)
    return (o, final) if output_final_state else o


def lasp2_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          log_decay: torch.Tensor | None = None, group: dist.ProcessGroup | None = None,
                          layout: str = "contiguous", initial_state: torch.Tensor | None = None,
                          output_final_state: bool = False,
                          cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                          scan: str = "allgather") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a sequence sharded across the CP group (LASP-2: one all-gather each way).

        S_t = a_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,   o_t = S_t^T q_t,   a_t = exp(log_decay_t)

    Args:
        q, k: `[b, s_local, h, dk]`, this rank's tokens (`shard_sequence(x, layout=layout)`); the caller
            normalises k (and scales q).
        v: `[b, s_local, h, dv]`.
        beta: `[b, s_local, h]`, write strengths in [0, 1], sharded like q.
        log_decay: `[b, s_local, h]` (sharded like q) or `[h]` (replicated) log gates <= 0, or None (a_t = 1).
            Values are checked only with LCTRAIN_SP_DEBUG=1 (the check is a host sync).
        group: the CP group (default: the mesh's).
        layout: "contiguous" or "zigzag".
        initial_state: `[b, h, dk, dv]` state entering the whole sequence (the same on every rank), or None.
            Its gradient is returned on CP rank 0 (zeros elsewhere), so the sum over the group is the gradient.
        output_final_state: also return the state after the last token of the whole sequence (float32; every
            rank gets it; the gradients that flow into it on the different ranks are summed).
        cu_seqlens: packed documents (int `[n_docs + 1]` on q's device, the same on every rank: global
            boundaries of the un-sharded batch laid end to end, 0 ... b * seq_len, every sequence end a
            boundary), or the batch's `lctrain.sp.documents.PackedDocuments` (built once per batch): the state
            restarts from zero at each document start (a gate a_t = 0 there). Not with initial_state. Its
            values are checked only with debug checks on.
        scan: "allgather" (one all-gather of every chunk map, folded locally) or "tree" (an exclusive prefix scan
            of the maps in ceil(log2 CP) point-to-point rounds, O(1) maps per message: `lctrain.sp.lasp2_scan`).
    Returns:
        `o` `[b, s_local, h, dv]` in v's dtype, or `(o, final_state)` with `output_final_state`.

    Communication: forward one all-gather of `n_chunks * b * h * dk * (dk + dv)` float32 per rank, backward one
    of `n_chunks * b * h * dk * dv` (plus one `b * h * dk * dv` slot with output_final_state; n_chunks = 1
    contiguous, 2 zigzag), whatever the sequence length.
    A `[h]` log_decay that requires grad gets each rank's contribution (their sum is the gradient).
    """
    return lasp2_chunk_map_attention(q, k, v, log_decay, beta, "delta", group, layout, initial_state,
                                     output_final_state, name="lasp2_delta_attention", tag="lasp2_delta",
                                     cu_seqlens=cu_seqlens, scan=scan)
