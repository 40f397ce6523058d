"""LASP-2 with a log-depth scan of the chunk maps instead of one all-gather (`scan="tree"`).

Every chunk acts on the state as an affine map S -> T S + M (README_lasp2_gated.md), and affine maps compose
associatively: (T2, M2) o (T1, M1) = (T2 T1, T2 M1 + M2). The state entering a chunk is the composition of all
earlier chunks' maps applied to the initial state: an exclusive prefix scan. This module runs it as a
Hillis-Steele scan over the CP ranks, in ceil(log2 P) rounds of point-to-point transfers: in round k (d = 2^k)
rank r sends its running composition to r + d and receives r - d's, so after the last round it holds the
composition of every lower rank's maps -- ONE map, not P. Every message is O(1) maps (`[b, h, |T| + dk dv]`), so
bytes per rank are O(log P x state), against the all-gather's O(P x state) received and held.

Zigzag (rank r holds the early chunk r and the late chunk 2P-1-r): the chain runs up through the early chunks
(E_0 ... E_(P-1)), then down through the late ones (L_(P-1) ... L_0). Rank r needs

    S_early = E_(<r) (S_init)
    S_late  = L_(>r) o E_(>r) o E_r (S_early)          (E_(>r) = E_(P-1) o ... o E_(r+1), L_(>r) = L_(r+1) o ... o L_(P-1))

so the same rounds run two scans at once: upwards (from lower ranks) of E, downwards (from higher ranks) of the
pair (E, L). The final state, when asked for, is L_(<r) o L_r (S_late leaving), so the upward scan also carries L.

Backward is the same scan over the adjoint maps Lambda -> T_c^T Lambda + D_c in the reverse chunk order
(Lambda_c = D_c + T_c^T Lambda_(c+1), dL/dM_c = Lambda_(c+1)); the gradient of the final state, a sum of every
rank's share, rides along as an additive component of both directions' messages. While the backward rounds are
in flight each rank recomputes its own chunk maps under autograd (what the all-gather version overlaps too). While
the forward rounds are in flight, gated linear attention (plain, fixed decay, scalar and vector gates) computes its
chunks from a zero state and afterwards adds the state term (q_t e^(G_t)) S_in; the delta rule's local pass waits
for the entering state, as in the all-gather version.

Each round is one `batch_isend_irecv` tagged `{tag}.fwd.round{k}` / `{tag}.bwd.round{k}` (tests count them).
"""
from __future__ import annotations

import torch

from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.precision import fp32_by_design
from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.sharding import chunk_ids
from lctrain.sp.lasp2_delta import _apply, _chunk_map, _input_grads, _local, _stack, _unstack

SCANS = ("allgather", "tree")

#: A map S -> U S + D: U is `[b, h]` (scalar), `[b, h, dk]` (vector) or `[b, h, dk, dk]` (delta); D `[b, h, dk, dv]`.
Map = tuple[torch.Tensor, torch.Tensor]
#: A scan element: named maps (composed in their leg's direction) and "sum" (an additive `[b, h, dk, dv]` term).
Elem = dict[str, "Map | torch.Tensor"]


#: The `fp32_by_design` reason of the scan's state-only products (lctrain.ops.precision).
_STATE_ONLY = "LASP-2 tree scan: composing and applying chunk maps (states and [dk, dk] maps, no sequence dimension)"


def scan_rounds(world: int) -> int:
    """Point-to-point rounds of one scan over `world` ranks: ceil(log2 P)."""
    return max(0, (world - 1).bit_length())


def _times(a: torch.Tensor, b: torch.Tensor, variant: str) -> torch.Tensor:
    """The linear part of a o b (U_a U_b)."""
    return a @ b if variant == "delta" else a * b


def _compose(outer: Map, inner: Map, variant: str) -> Map:
    """outer o inner: S -> U_o (U_i S + D_i) + D_o."""
    with fp32_by_design(_STATE_ONLY):
        return _times(outer[0], inner[0], variant), _apply(outer[0], inner[1], variant) + outer[1]


def _run(m: Map | None, s: torch.Tensor, variant: str) -> torch.Tensor:
    """m(s); None is the identity."""
    if m is None:
        return s
    with fp32_by_design(_STATE_ONLY):
        return _apply(m[0], s, variant) + m[1]


def _combine(lower: Elem | None, higher: Elem | None, ascending: dict[str, bool], variant: str) -> Elem | None:
    """The element of the rank segment `lower` followed by `higher` (None: the empty segment).

    A map whose leg runs up the ranks applies the lower ranks first (higher o lower); one whose leg runs down
    applies the higher ranks first (lower o higher). Sums add.
    """
    if lower is None or higher is None:
        return higher if lower is None else lower
    out: Elem = {}
    for name, a in lower.items():
        b = higher[name]
        if name == "sum":
            out[name] = a + b
        else:
            out[name] = _compose(b, a, variant) if ascending[name] else _compose(a, b, variant)
    return out


def _pack(e: Elem) -> torch.Tensor:
    """One contiguous buffer `[b, h, n]` of an element's tensors, in name order."""
    parts = []
    for name in sorted(e):
        x = e[name]
        for t in ((x,) if name == "sum" else x):
            parts.append(t.reshape(t.shape[0], t.shape[1], -1))
    return torch.cat(parts, dim=-1)


def _unpack(buf: torch.Tensor, like: Elem) -> Elem:
    out: Elem = {}
    at = 0
    for name in sorted(like):
        x = like[name]
        pieces = []
        for t in ((x,) if name == "sum" else x):
            n = t[0, 0].numel()
            pieces.append(buf[..., at:at + n].reshape(t.shape))
            at += n
        out[name] = pieces[0] if name == "sum" else tuple(pieces)
    return out


def tree_scan(up: Elem | None, down: Elem | None, ascending: dict[str, bool], variant: str, group, rank: int,
              world: int, tag: str, overlap=None) -> tuple[Elem | None, Elem | None]:
    """Exclusive scans of per-rank elements, both directions at once, in ceil(log2 P) rounds (Hillis-Steele).

    Args:
        up: this rank's element of the upward scan (result: the segment of all lower ranks), or None.
        down: this rank's element of the downward scan (result: the segment of all higher ranks), or None.
            Every rank passes elements of the same structure and shapes.
        ascending: per map name, whether its leg runs up the ranks (see `_combine`).
        overlap: called once after the first round is posted (work to hide behind the transfers).
    Returns:
        (segment of ranks < r, segment of ranks > r); None where that segment is empty.
    """
    x_up, x_dn, ex_up, ex_dn = up, down, None, None
    d, k = 1, 0
    while d < world:
        ops, got_up, got_dn = [], None, None
        if up is not None:
            if rank + d < world:
                ops.append(P2POp("send", _pack(x_up), rank + d))
            if rank - d >= 0:
                got_up = torch.empty_like(_pack(up))
                ops.append(P2POp("recv", got_up, rank - d))
        if down is not None:
            if rank - d >= 0:
                ops.append(P2POp("send", _pack(x_dn), rank - d))
            if rank + d < world:
                got_dn = torch.empty_like(_pack(down))
                ops.append(P2POp("recv", got_dn, rank + d))
        with comm.comm_tag(f"round{k}"):
            handle = comm.batch_isend_irecv(ops, group) if ops else None
        if overlap is not None:
            overlap()
            overlap = None
        if handle is not None:
            handle.wait()
        if got_up is not None:
            y = _unpack(got_up, up)
            x_up, ex_up = _combine(y, x_up, ascending, variant), _combine(y, ex_up, ascending, variant)
        if got_dn is not None:
            y = _unpack(got_dn, down)
            x_dn, ex_dn = _combine(x_dn, y, ascending, variant), _combine(ex_dn, y, ascending, variant)
        d, k = 2 * d, k + 1
    if overlap is not None:
        overlap()
    return ex_up, ex_dn


def _decayed_queries(qs: torch.Tensor, gs: torch.Tensor | None, sdt: torch.dtype) -> torch.Tensor:
    """q_t e^(G_t), G_t the chunk's log gates summed up to and including t: what multiplies the entering state
    (gated linear attention; a `[h]` decay gives lambda^(t+1), a -inf document start zeroes the rest)."""
    q = qs.to(sdt)
    if gs is None:
        return q
    if gs.dim() == 1:  # [h]: the same log gate at every token
        steps = torch.arange(1, q.shape[1] + 1, device=q.device, dtype=sdt)
        return q * torch.exp(steps[:, None] * gs.to(sdt))[None, :, :, None]
    cum = torch.exp(gs.to(sdt).cumsum(1))  # [b, C, h] or [b, C, h, dk]; sums of terms <= 0: no cancellation
    return q * (cum[..., None] if gs.dim() == 3 else cum)


def _get(e: Elem | None, name: str):
    return None if e is None else e.get(name)


def _transpose(t: torch.Tensor, variant: str) -> torch.Tensor:
    return t.transpose(-1, -2) if variant == "delta" else t


class LASP2TreeScan(torch.autograd.Function):
    """Same arguments and results as `lctrain.sp.lasp2_delta._LASP2ChunkMap`, with the tree scan for the fold."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, variant, group, layout, rank, world, tag, want_final,
                backend=None):
        ids = chunk_ids(rank, world, layout)
        n_loc = len(ids)
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        sdt = compute_dtype(q.dtype)
        qs, ks, vs, gs, bs = (_stack(x, n_loc) for x in (q, k, v, g, beta))  # [n_loc*b, C, h, ...]
        s0 = (initial_state.to(sdt) if initial_state is not None
              else torch.zeros(b, h, dk, dv, dtype=sdt, device=q.device))
        t_loc, m_loc = _chunk_map(variant, ks, vs, gs, bs)  # [n_loc*b, h, ...]
        t_loc, m_loc = t_loc.to(sdt), m_loc.to(sdt)
        early = (t_loc[:b], m_loc[:b])
        zig = n_loc == 2
        late = (t_loc[b:], m_loc[b:]) if zig else None
        up: Elem = {"F": early}
        if zig and want_final:
            up["G"] = late
        down: Elem | None = ({"F": early, "G": late} if zig else {"F": early}) if zig or want_final else None
        # Gated linear attention: o = o(S = 0) + (q_t e^(G_t)) S, so the state-free part runs during the rounds.
        # (The delta rule's state term is no such product: its local pass waits for the entering state.)
        split: dict = {}

        def intra():
            split["o0"] = _local(variant, qs, ks, vs, gs, bs, s0.new_zeros((len(qs),) + tuple(s0.shape[1:])), backend)

        with comm.comm_tag(f"{tag}.fwd"):
            ex_up, ex_dn = tree_scan(up, down, {"F": True, "G": False}, variant, group, rank, world, tag,
                                     overlap=intra if variant != "delta" else None)
        enter = [_run(_get(ex_up, "F"), s0, variant)]
        leave = _run(early, enter[0], variant)
        if zig:
            enter.append(_run(_get(ex_dn, "G"), _run(_get(ex_dn, "F"), leave, variant), variant))
            final = _run(_get(ex_up, "G"), _run(late, enter[1], variant), variant) if want_final else None
        else:
            final = _run(_get(ex_dn, "F"), leave, variant) if want_final else None
        entering = torch.cat(enter, dim=0)  # [n_loc*b, h, dk, dv]
        if variant == "delta":
            o = _local(variant, qs, ks, vs, gs, bs, entering, backend)
        else:
            # Input-dtype operands (decayed in sdt, then rounded), float32 state cast for the product only.
            inter = torch.einsum("bshk,bhkv->bshv", _decayed_queries(qs, gs, sdt).to(qs.dtype), entering.to(qs.dtype))
            o = (split["o0"].to(sdt) + inter.to(sdt)).to(split["o0"].dtype)
        ctx.variant, ctx.group, ctx.layout, ctx.rank, ctx.world, ctx.tag = variant, group, layout, rank, world, tag
        ctx.has_initial, ctx.want_final, ctx.backend = initial_state is not None, want_final, backend
        ctx.save_for_backward(q, k, v, g, beta, entering, t_loc)
        return _unstack(o, n_loc), (final if want_final else o.new_zeros(0))

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, beta, entering, t_loc = ctx.saved_tensors
        variant, group, rank, world = ctx.variant, ctx.group, ctx.rank, ctx.world
        n_loc = len(chunk_ids(rank, world, ctx.layout))
        b = q.shape[0]
        need = ctx.needs_input_grad
        with torch.enable_grad():
            qs, ks, vs = (_stack(x, n_loc).detach().requires_grad_(True) for x in (q, k, v))
            gs = g.detach().requires_grad_(True) if g is not None and need[3] else g
            gs_loc = _stack(gs, n_loc)
            bs = beta.detach().requires_grad_(True) if beta is not None and need[4] else beta
            bs_loc = _stack(bs, n_loc)
            s_in = entering.detach().requires_grad_(True)
            o = _local(variant, qs, ks, vs, gs_loc, bs_loc, s_in, ctx.backend)
            leaves = [qs, ks, vs, s_in] + [x for x in (gs, bs) if x is not None and x.requires_grad]
            grads = list(torch.autograd.grad(o, leaves, _stack(do, n_loc), allow_unused=True))
        d_in = grads[3].to(entering.dtype)  # D_c of this rank's chunks, [n_loc*b, h, dk, dv]
        # Adjoint maps Lambda -> T_c^T Lambda + D_c; the chain runs backwards through the chunks.
        adj = [(_transpose(t_loc[i * b:(i + 1) * b], variant), d_in[i * b:(i + 1) * b]) for i in range(n_loc)]
        f = d_final.to(d_in.dtype) if ctx.want_final else None
        zig = n_loc == 2
        if zig:  # late chunks upwards (rank 0's is last in the sequence), then early chunks downwards
            up: Elem | None = {"F": adj[1]}
            down: Elem | None = {"F": adj[1], "G": adj[0]}
            ascending = {"F": True, "G": False}
        else:  # the single leg runs down the ranks
            up, down, ascending = None, {"F": adj[0]}, {"F": False}
        if f is not None:
            up = dict(up or {}, sum=f)
            down["sum"] = f
        state: dict = {}

        def recompute_maps():
            # While the rounds are in flight: the rank's own chunk maps S_out = T S_in + M under autograd.
            with torch.enable_grad():
                t_l, m_l = _chunk_map(variant, ks, vs, gs_loc, bs_loc)
                state["leaving"] = _run((t_l, m_l), entering, variant)

        with comm.comm_tag(f"{ctx.tag}.bwd"):
            ex_up, ex_dn = tree_scan(up, down, ascending, variant, group, rank, world, ctx.tag,
                                     overlap=recompute_maps)
        lam_g = torch.zeros_like(d_in[:b])  # dL/dS_final: every rank's share, summed
        for part in (f, _get(ex_up, "sum"), _get(ex_dn, "sum")):
            if part is not None:
                lam_g = lam_g + part
        if zig:
            lam_late = _run(_get(ex_up, "F"), lam_g, variant)  # dL/d(state leaving the late chunk)
            mid = _run(_get(ex_dn, "F"), _run(adj[1], lam_late, variant), variant)
            lam_early = _run(_get(ex_dn, "G"), mid, variant)
            lam_own = torch.cat([lam_early, lam_late], dim=0)
        else:
            lam_early = lam_own = _run(_get(ex_dn, "F"), lam_g, variant)
        map_leaves = [ks, vs] + [x for x in (gs, bs) if x is not None and x.requires_grad]
        map_grads = torch.autograd.grad(state["leaving"], map_leaves, lam_own, allow_unused=True)
        dq, dk, dv, dg, dbeta = _input_grads(grads, map_grads, n_loc, gs, bs, g, beta)
        d_init = None
        if ctx.has_initial and need[5]:
            # Replicated initial state: CP rank 0 (first chunk) returns dL/dS_init = Lambda_0, the others zeros.
            lam0 = _run(adj[0], lam_early, variant)
            d_init = lam0 if rank == 0 else torch.zeros_like(lam0)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dbeta, d_init,
                None, None, None, None, None, None, None, None)


def check_scan(scan: str, causal: bool = True) -> str | None:
    """What is wrong with a `scan=` argument, or None."""
    if scan not in SCANS:
        return f"unknown scan {scan!r}; expected one of {SCANS}"
    if scan == "tree" and not causal:
        return "scan='tree' is a prefix scan (causal); non-causal linear attention needs only the sum (allgather)"
    return None
