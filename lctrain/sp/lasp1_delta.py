"""LASP-1 for recurrences with affine chunk maps (gated delta rule, data-dependent gates): the serial state ring,
the baseline that lasp2_delta.py is measured against.

Contiguous layout: rank r holds chunk r. Forward: rank r computes its chunk map (T_r, M_r) (no communication),
receives the entering state S_r from rank r-1 (rank 0 starts from the initial state), sends
S_(r+1) = T_r S_r + M_r to rank r+1 and runs its chunk from S_r: P-1 dependent point-to-point steps. Backward in
reverse: rank r receives Lambda_(r+1) = dL/dS_(r+1) from rank r+1 (zero on the last rank), which is also dL/dM_r
(and dL/dT_r = Lambda_(r+1) S_r^T), and sends Lambda_r = D_r + T_r^T Lambda_(r+1) to rank r-1 (D_r: the gradient
its own outputs put on S_r). Notation and derivation: README_lasp2_gated.md. Packed documents (`cu_seqlens=`):
the same -inf reset gates as `lctrain.sp.lasp2_delta` (`document_log_gate`), the same P-1 sends.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.chunk_recompute import differentiate_now
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.precision import fp32_by_design
from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.sp.documents import PackedDocuments, as_documents
from lctrain.sp.lasp2_delta import (DOCUMENT_BACKEND, VARIANTS, _apply, _chunk_map, _local, check_chunk_map_inputs,
                                    document_log_gate)


def _recv(like: torch.Tensor, peer: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    buf = torch.empty_like(like)
    comm.batch_isend_irecv([P2POp("recv", buf, peer)], group).wait()
    return buf


class _LASP1ChunkMap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, variant, group, rank, world, tag, backend=None):
        b, _, h, dk = q.shape
        sdt = compute_dtype(q.dtype)
        t_loc, m_loc = _chunk_map(variant, k, v, g, beta)  # computed before waiting on the chain
        entering = (initial_state.to(sdt) if initial_state is not None and rank == 0
                    else torch.zeros(b, h, dk, v.shape[-1], dtype=sdt, device=q.device))
        send = None
        with comm.comm_tag(f"{tag}.fwd"):
            if rank > 0:
                entering = _recv(entering, rank - 1, group)
            if rank < world - 1:
                with fp32_by_design("LASP-1 chunk map applied to the entering state (no sequence dimension)"):
                    leaving = (_apply(t_loc.to(sdt), entering, variant) + m_loc.to(sdt)).contiguous()
                send = comm.batch_isend_irecv([P2POp("send", leaving, rank + 1)], group)
        o = _local(variant, q, k, v, g, beta, entering, backend)
        if send is not None:
            send.wait()
        ctx.save_for_backward(q, k, v, g, beta, entering)
        ctx.variant, ctx.group, ctx.rank, ctx.world, ctx.tag = variant, group, rank, world, tag
        ctx.has_initial, ctx.backend = initial_state is not None, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, beta, entering = ctx.saved_tensors
        variant, group, rank, world = ctx.variant, ctx.group, ctx.rank, ctx.world
        need = ctx.needs_input_grad
        # The local pass is differentiated at once: its graph is built directly (not the lean recompute op).
        with torch.enable_grad(), differentiate_now():
            qr, kr, vr = (x.detach().requires_grad_(True) for x in (q, k, v))
            gr = g.detach().requires_grad_(True) if g is not None and need[3] else g
            br = beta.detach().requires_grad_(True) if beta is not None and need[4] else beta
            s_in = entering.detach().requires_grad_(True)
            extra = [x for x in (gr, br) if x is not None and x.requires_grad]
            o = _local(variant, qr, kr, vr, gr, br, s_in, ctx.backend)
            grads = list(torch.autograd.grad(o, [qr, kr, vr, s_in] + extra, do, allow_unused=True))
        lam = grads[3]  # D_r
        send = None
        with comm.comm_tag(f"{ctx.tag}.bwd"):
            if rank < world - 1:
                lam_next = _recv(lam, rank + 1, group)  # Lambda_(r+1) = dL/dM_r
                with torch.enable_grad():
                    t_loc, m_loc = _chunk_map(variant, kr, vr, gr, br)
                    with fp32_by_design("LASP-1 chunk map applied to the entering state (no sequence dimension)"):
                        leaving = _apply(t_loc, entering, variant) + m_loc
                    map_grads = torch.autograd.grad(leaving, [kr, vr] + extra, lam_next, allow_unused=True)
                grads[1] = grads[1] + map_grads[0]
                grads[2] = grads[2] + map_grads[1]
                for i, mg in enumerate(map_grads[2:]):
                    grads[4 + i] = mg if grads[4 + i] is None else (grads[4 + i] if mg is None else grads[4 + i] + mg)
                with fp32_by_design("LASP-1 adjoint chunk map on the state gradient (no sequence dimension)"):
                    lam = lam + _apply(t_loc.detach(), lam_next, variant, transpose=True)
            if rank > 0:
                send = comm.batch_isend_irecv([P2POp("send", lam.contiguous(), rank - 1)], group)
        if send is not None:
            send.wait()
        dg = dbeta = None
        i = 4
        if gr is not None and gr.requires_grad:
            dg, i = grads[i].to(g.dtype), i + 1
        if br is not None and br.requires_grad:
            dbeta = grads[i].to(beta.dtype)
        d_init = None
        if ctx.has_initial and need[5]:
            d_init = lam if rank == 0 else torch.zeros_like(lam)  # the initial state enters on rank 0
        return (grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), dg, dbeta, d_init,
                None, None, None, None, None, None)


def lasp1_chunk_map_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                              beta: torch.Tensor | None, variant: str, group: dist.ProcessGroup | None = None,
                              initial_state: torch.Tensor | None = None, name: str = "lasp1",
                              tag: str = "lasp1", cu_seqlens: torch.Tensor | PackedDocuments | None = None,
                              problem: str | None = None) -> torch.Tensor:
    """LASP-1 for a recurrence given by its chunk maps (`variant`: "scalar", "vector" or "delta"), contiguous.

    Arguments as `lasp2_chunk_map_attention` (no layout: contiguous only; no final state). Collectives are
    point-to-point, tagged `{tag}.fwd` / `{tag}.bwd`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown chunk-map variant {variant!r}; expected one of {VARIANTS}")
    group = cp_group_or_default(group)
    rank, world = check_chunk_map_inputs(name, q, k, v, g, beta, initial_state, variant, group, "contiguous",
                                         False, cu_seqlens, problem)
    backend = None
    if cu_seqlens is not None:
        starts = as_documents(cu_seqlens, q, rank, world, "contiguous").starts  # [b, s_local], no sync
        g, backend = document_log_gate(g, starts, q, variant == "vector"), DOCUMENT_BACKEND
    return _LASP1ChunkMap.apply(q, k, v, g, beta, initial_state, variant, group, rank, world, tag, backend)


def lasp1_delta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                          log_decay: torch.Tensor | None = None, group: dist.ProcessGroup | None = None,
                          initial_state: torch.Tensor | None = None,
                          cu_seqlens: torch.Tensor | PackedDocuments | None = None) -> torch.Tensor:
    """The gated delta rule over a contiguously sharded sequence, the state passed serially rank to rank (LASP-1).

    Args:
        q, k, v, beta, log_decay, group, initial_state, cu_seqlens: as `lasp2_delta_attention` (contiguous layout).
    Returns:
        `o` `[b, s_local, h, dv]` in v's dtype.

    Communication: P-1 dependent sends of one `[b, h, dk, dv]` state forward, P-1 backward.
    """
    return lasp1_chunk_map_attention(q, k, v, log_decay, beta, "delta", group, initial_state,
                                     name="lasp1_delta_attention", tag="lasp1_delta", cu_seqlens=cu_seqlens)
