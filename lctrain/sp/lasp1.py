"""LASP-1: sequence-parallel linear attention by passing the state rank to rank (the baseline for LASP-2).

Contiguous layout: rank r holds tokens [r C, (r+1) C). Forward: each rank computes its chunk's memory state
M_r (no communication), then waits for the state S_r entering its chunk from rank r-1, sends
S_{r+1} = lambda^C S_r + M_r on to rank r+1 and runs causal linear attention on its chunk from S_r. The chain
is serial: P-1 dependent point-to-point steps, so its latency grows with P (LASP-2 replaces it by one
all-gather). Backward runs the chain in reverse: rank r gets G_{r+1} = dL/dS_{r+1} from rank r+1, sends
G_r = dS_r(local) + lambda^C G_{r+1} to rank r-1, and G_{r+1} is also the gradient of its own M_r.

Non-causal: o = q . (sum of all M). The states circulate once around the ring (P-1 steps; at each step every
rank forwards the state it received last and adds it to its running sum), so every rank ends with the total;
the backward circulates the per-rank gradients of the total the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.chunk_recompute import differentiate_now
from lctrain.ops.linear_attention import linear_attention, memory_state
from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.sp.documents import PackedDocuments
from lctrain.sp.lasp1_delta import lasp1_chunk_map_attention
from lctrain.sp.lasp2 import check_linear_sp_inputs


def _recv(like: torch.Tensor, peer: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    buf = torch.empty_like(like)
    comm.batch_isend_irecv([P2POp("recv", buf, peer)], group).wait()
    return buf


def _ring_sum(x: torch.Tensor, rank: int, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of every rank's `x` by circulating them around the ring (P-1 steps of send-next, receive-previous)."""
    total, travelling = x.clone(), x.contiguous()
    for _ in range(world - 1):
        incoming = torch.empty_like(x)
        comm.batch_isend_irecv([P2POp("send", travelling, (rank + 1) % world),
                                P2POp("recv", incoming, (rank - 1) % world)], group).wait()
        total += incoming
        travelling = incoming
    return total


class _LASP1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, causal, rank, world):
        ctx.group, ctx.causal, ctx.rank, ctx.world = group, causal, rank, world
        if not causal:
            with comm.comm_tag("lasp1.fwd"):
                total = _ring_sum(memory_state(k, v), rank, world, group)  # [b, h, dk, dv]
            ctx.save_for_backward(q, k, v, total)
            return torch.einsum("bshk,bhkv->bshv", q, total.to(q.dtype)).to(v.dtype)  # input-dtype operands

        mem = memory_state(k, v, log_decay)  # [b, h, dk, dv]; computed before waiting on the chain
        entering = torch.zeros_like(mem)
        send = None
        with comm.comm_tag("lasp1.fwd"):
            if rank > 0:
                entering = _recv(mem, rank - 1, group)
            if rank < world - 1:
                leaving = mem + (entering if log_decay is None else _chunk_decay(log_decay, q.shape[1], mem) * entering)
                send = comm.batch_isend_irecv([P2POp("send", leaving, rank + 1)], group)
        o, _ = linear_attention(q, k, v, log_decay, initial_state=entering)
        if send is not None:
            send.wait()
        ctx.save_for_backward(q, k, v, log_decay, entering)
        return o

    @staticmethod
    def backward(ctx, do):
        group, rank, world = ctx.group, ctx.rank, ctx.world
        if not ctx.causal:
            q, k, v, total = ctx.saved_tensors
            sdt = total.dtype
            with comm.comm_tag("lasp1.bwd"):
                d_mem = _ring_sum(torch.einsum("bshk,bshv->bhkv", q, do.to(q.dtype)).to(sdt), rank, world, group)
            idt = q.dtype  # matmul operands in the input dtype, the ring-summed states in sdt
            dq = torch.einsum("bshv,bhkv->bshk", do.to(idt), total.to(idt))
            dk = torch.einsum("bshv,bhkv->bshk", v, d_mem.to(idt))
            dv = torch.einsum("bshk,bhkv->bshv", k, d_mem.to(idt))
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None

        q, k, v, log_decay, entering = ctx.saved_tensors
        decay_grad = bool(ctx.needs_input_grad[3])
        # The local pass is differentiated at once: its graph is built directly (not the lean recompute op).
        with torch.enable_grad(), differentiate_now():
            qr, kr, vr = (x.detach().requires_grad_(True) for x in (q, k, v))
            s_in = entering.detach().requires_grad_(True)
            ld = log_decay.detach().requires_grad_(True) if decay_grad else log_decay
            o, _ = linear_attention(qr, kr, vr, ld, initial_state=s_in)
            inputs = [qr, kr, vr, s_in] + ([ld] if decay_grad else [])
            grads = list(torch.autograd.grad(o, inputs, do))
        d_in = grads[3]
        d_ld = grads[4] if decay_grad else None
        send = None
        with comm.comm_tag("lasp1.bwd"):
            if rank < world - 1:
                # G_{r+1}: the gradient of the state this rank passed on (it is also dL/dM_r).
                d_out = _recv(d_in, rank + 1, group)
                with torch.enable_grad():
                    leaving = memory_state(kr, vr, ld)
                    if log_decay is not None:
                        leaving = leaving + _chunk_decay(ld, q.shape[1], leaving) * entering
                    else:
                        leaving = leaving + entering
                    wrt = [kr, vr] + ([ld] if decay_grad else [])
                    extra = torch.autograd.grad(leaving, wrt, d_out)
                grads[1] = grads[1] + extra[0]
                grads[2] = grads[2] + extra[1]
                if decay_grad:
                    d_ld = d_ld + extra[2]
                d_in = d_in + (d_out if log_decay is None else _chunk_decay(log_decay, q.shape[1], d_out) * d_out)
            if rank > 0:
                send = comm.batch_isend_irecv([P2POp("send", d_in.contiguous(), rank - 1)], group)
        if send is not None:
            send.wait()
        dq, dk, dv = grads[:3]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_ld.to(log_decay.dtype) if decay_grad else None,
                None, None, None, None)


def _chunk_decay(log_decay: torch.Tensor, chunk_len: int, like: torch.Tensor) -> torch.Tensor:
    """lambda^C per head, shaped `[h, 1, 1]` to scale a `[b, h, dk, dv]` state."""
    return torch.exp(log_decay.to(like.dtype) * chunk_len)[:, None, None]


def lasp1_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                           group: dist.ProcessGroup | None = None, causal: bool = True,
                           cu_seqlens: torch.Tensor | PackedDocuments | None = None) -> torch.Tensor:
    """Linear attention over a contiguously sharded sequence, the state passed serially rank to rank (LASP-1).

    Args:
        q, k: `[b, s_local, h, dk]`, this rank's contiguous chunk (`shard_sequence(x, layout="contiguous")`).
        v: `[b, s_local, h, dv]`.
        log_decay: `[h]`, log(lambda) <= 0 per head, or None. When it requires grad, each rank returns its own
            contribution to the gradient (the sum over the CP group is the full gradient). Data-dependent gates
            `[b, s_local, h]` or `[b, s_local, h, dk]` (sharded like q; causal only) pass each chunk's state
            map along the same ring (`lctrain.sp.lasp1_delta`).
        group: the CP group (default: the mesh's).
        causal: causal (optionally decayed) or full non-causal linear attention (no decay).
        cu_seqlens: packed documents (causal only), as `lasp2_linear_attention`: the state restarts at each
            document start (reset gates on the chunk-map ring, `lctrain.sp.lasp1_delta`; same P-1 sends).
    Returns:
        `o` `[b, s_local, h, dv]` in v's dtype.

    Communication (causal): P-1 dependent sends of one `[b, h, dk, dv]` state forward, P-1 backward.
    Non-causal: every rank sends P-1 states each way.
    """
    group = cp_group_or_default(group)
    if cu_seqlens is not None:
        vector = log_decay is not None and log_decay.dim() == 4
        problem = None if causal else "cu_seqlens (packed documents) needs causal=True"
        return lasp1_chunk_map_attention(q, k, v, log_decay, None, "vector" if vector else "scalar", group,
                                         name="lasp1_linear_attention", tag="lasp1", cu_seqlens=cu_seqlens,
                                         problem=problem)
    if log_decay is not None and log_decay.dim() > 1:
        if not causal:
            raise ValueError("lasp1_linear_attention: a decay (log_decay) is only defined for causal linear "
                             "attention; pass causal=True or log_decay=None")
        return lasp1_chunk_map_attention(q, k, v, log_decay, None, "vector" if log_decay.dim() == 4 else "scalar",
                                         group, name="lasp1_linear_attention", tag="lasp1")
    rank, world = check_linear_sp_inputs("lasp1_linear_attention", q, k, v, log_decay, group, causal, "contiguous")
    return _LASP1.apply(q, k, v, log_decay, group, causal, rank, world)
