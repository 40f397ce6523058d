"""LASP-2: sequence-parallel linear attention (with per-head decay) by ONE all-gather of memory states.

Each CP rank holds one chunk of C tokens (contiguous layout) or two (zigzag: chunks r and 2P-1-r of 2P).
For every chunk it holds it computes the chunk's memory state M_g = sum_s lambda^(C-1-s) k_s^T v_s
(`[b, h, dk, dv]`, float32, independent of the sequence length); one all-gather brings every M to every
rank, which forms the state entering each of its chunks locally,

    S_g = sum_{j<g} lambda^(C (g-1-j)) M_j,

and runs causal linear attention on the chunk starting from S_g (intra-chunk part + (q_t lambda^(t+1)) S_g)
through the local backend dispatch. The backward pass recomputes the local pass, all-gathers the gradients
dS_g of the entering states (the second and last collective) and forms each chunk's dM_j = sum_{g>j}
lambda^(C (g-1-j)) dS_g locally. Non-causal: o = q . (sum of all M). Derivation: README_lasp2.md.

`check_linear_sp_inputs` (shared with LASP-1) validates inputs on every rank before any collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.ops.linear_attention import check_linear_attention_inputs, linear_attention, memory_state
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default
from lctrain.parallel.sharding import LAYOUTS, chunk_ids


def check_linear_sp_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           log_decay: torch.Tensor | None, group: dist.ProcessGroup | None, causal: bool,
                           layout: str) -> tuple[int, int]:
    """Validate the inputs of a linear-attention SP call on every rank of `group`, before any collective.

    Local problems (shapes, decay > 0, decay without causal, a zigzag slice of odd length) and differences
    between ranks (shapes, dtype, decay or not, mode) are exchanged as metadata (one small uncounted
    object all-gather), so every rank raises the same ValueError instead of some ranks hanging.

    Returns:
        (this rank, group size).
    """
    error = None
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
        error = str(err)
    rank, world = comm.group_rank(group), comm.group_size(group)
    if error is None and layout == "zigzag" and q.shape[1] % 2:
        error = (f"sequence length {q.shape[1] * world} is not divisible by 2*CP = {2 * world} (zigzag layout: "
                 f"this rank's slice has odd length {q.shape[1]})")
    sig = (tuple(q.shape), tuple(v.shape), str(q.dtype), log_decay is None, bool(causal), layout, q.device.type)
    metas = comm.all_gather_object((error, sig), group) if world > 1 else [(error, sig)]
    errors = [(r, e) for r, (e, _) in enumerate(metas) if e is not None]
    if errors:
        raise ValueError(f"{name}: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
    sigs = [s for _, s in metas]
    if any(s != sigs[0] for s in sigs):
        lens = [s[0][1] for s in sigs]
        hint = (f" (sequence lengths per rank {lens}: the full sequence must split evenly, i.e. be divisible "
                f"by {'2*CP' if layout == 'zigzag' else 'CP'} = {(2 if layout == 'zigzag' else 1) * world})"
                if len(set(lens)) > 1 else "")
        detail = "; ".join(f"rank {r}: q {s[0]}, v {s[1]}, {s[2]}, decay={not s[3]}, causal={s[4]}, layout={s[5]}"
                           for r, s in enumerate(sigs))
        raise ValueError(f"{name}: inputs differ between CP ranks{hint}: {detail}")
    return rank, world


def _prefix_weights(log_decay: torch.Tensor | None, num_chunks: int, chunk_len: int, num_heads: int,
                    dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """W[g, j, h] = lambda_h^(C (g-1-j)) for j < g, else 0: how chunk j's state reaches the start of chunk g."""
    g = torch.arange(num_chunks, device=device)
    steps = (g[:, None] - 1 - g[None, :])  # [G, G]
    before = (steps >= 0).to(dtype)
    if log_decay is None:
        return before[..., None].expand(num_chunks, num_chunks, num_heads)
    expo = (steps.clamp_min(0) * chunk_len).to(dtype)
    return torch.exp(expo[..., None] * log_decay.to(dtype)) * before[..., None]  # [G, G, h]


def _gather_chunks(x: torch.Tensor, group: dist.ProcessGroup | None, layout: str, world: int) -> torch.Tensor:
    """All-gather per-chunk states `[n_loc, b, h, dk, dv]` and put them in global chunk order `[G, ...]`."""
    gathered = comm.all_gather(x, group=group)  # rank-major: rank r's chunks chunk_ids(r)
    order = [g for r in range(world) for g in chunk_ids(r, world, layout)]
    out = torch.empty_like(gathered)
    out[order] = gathered
    return out


def _stack_chunks(x: torch.Tensor, n_loc: int) -> torch.Tensor:
    """`[b, n_loc*C, ...]` -> `[n_loc*b, C, ...]` (a rank's chunks side by side in the batch)."""
    return torch.cat(x.chunk(n_loc, dim=1), dim=0) if n_loc > 1 else x


def _unstack_chunks(x: torch.Tensor, n_loc: int) -> torch.Tensor:
    """Inverse of `_stack_chunks`."""
    return torch.cat(x.chunk(n_loc, dim=0), dim=1) if n_loc > 1 else x


def _needs_decay_grad(ctx) -> bool:
    return bool(ctx.needs_input_grad[3])


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group, causal, layout, rank, world):
        sdt = compute_dtype(q.dtype)
        ids = chunk_ids(rank, world, layout)
        n_loc = len(ids)
        ctx.group, ctx.causal, ctx.layout, ctx.rank, ctx.world = group, causal, layout, rank, world
        if not causal:
            mem = memory_state(k, v)[None]  # [1, b, h, dk, dv], every local token counts
            with comm.comm_tag("lasp2.fwd"):
                total = comm.all_gather(mem, group=group).sum(0)  # [b, h, dk, dv]
            ctx.save_for_backward(q, k, v, total)
            return torch.einsum("bshk,bhkv->bshv", q.to(sdt), total).to(v.dtype)

        b, s, h, _ = q.shape
        chunk_len = s // n_loc
        qs, ks, vs = (_stack_chunks(x, n_loc) for x in (q, k, v))  # [n_loc*b, C, h, d]
        mem = memory_state(ks, vs, log_decay)  # [n_loc*b, h, dk, dv]
        with comm.comm_tag("lasp2.fwd"):
            mem_all = _gather_chunks(mem.view(n_loc, b, *mem.shape[1:]), group, layout, world)  # [G, b, h, dk, dv]
        weights = _prefix_weights(log_decay, n_loc * world, chunk_len, h, sdt, q.device)  # [G, G, h]
        entering = torch.einsum("gjh,jbhkv->gbhkv", weights[ids], mem_all).flatten(0, 1)  # [n_loc*b, h, dk, dv]
        o, _ = linear_attention(qs, ks, vs, log_decay, initial_state=entering)
        ctx.save_for_backward(q, k, v, log_decay, entering, mem_all if _needs_decay_grad(ctx) else None)
        return _unstack_chunks(o, n_loc)

    @staticmethod
    def backward(ctx, do):
        group, layout, rank, world = ctx.group, ctx.layout, ctx.rank, ctx.world
        if not ctx.causal:
            q, k, v, total = ctx.saved_tensors
            sdt = total.dtype
            d_total = torch.einsum("bshk,bshv->bhkv", q.to(sdt), do.to(sdt))[None]  # this rank's share of d(sum M)
            with comm.comm_tag("lasp2.bwd"):
                d_mem = comm.all_gather(d_total, group=group).sum(0)  # [b, h, dk, dv]
            dq = torch.einsum("bshv,bhkv->bshk", do.to(sdt), total)
            dk = torch.einsum("bshv,bhkv->bshk", v.to(sdt), d_mem)
            dv = torch.einsum("bshk,bhkv->bshv", k.to(sdt), d_mem)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None

        q, k, v, log_decay, entering, mem_all = ctx.saved_tensors
        decay_grad = _needs_decay_grad(ctx)
        ids = chunk_ids(rank, world, layout)
        n_loc = len(ids)
        b, s = q.shape[:2]
        chunk_len = s // n_loc
        sdt = entering.dtype
        with torch.enable_grad():
            qs, ks, vs = (_stack_chunks(x, n_loc).detach().requires_grad_(True) for x in (q, k, v))
            s_in = entering.detach().requires_grad_(True)
            ld = log_decay.detach().requires_grad_(True) if decay_grad else log_decay
            o, _ = linear_attention(qs, ks, vs, ld, initial_state=s_in)
            inputs = [qs, ks, vs, s_in] + ([ld] if decay_grad else [])
            grads = torch.autograd.grad(o, inputs, _stack_chunks(do, n_loc))
        dqs, dks, dvs, d_in = grads[:4]
        d_ld = grads[4] if decay_grad else None

        with comm.comm_tag("lasp2.bwd"):
            d_in_all = _gather_chunks(d_in.view(n_loc, b, *d_in.shape[1:]), group, layout, world)  # [G, b, h, dk, dv]
        num_chunks = n_loc * world
        with torch.enable_grad():
            weights = _prefix_weights(ld, num_chunks, chunk_len, q.shape[2], sdt, q.device)  # [G, G, h]
            # dM_j = sum_{g>j} W[g, j] dS_g for this rank's chunks j (a suffix sum over later chunks).
            d_mem = torch.einsum("gjh,gbhkv->jbhkv", weights[:, ids].detach(), d_in_all).flatten(0, 1)
            ks2, vs2 = ks.detach().requires_grad_(True), vs.detach().requires_grad_(True)
            mem = memory_state(ks2, vs2, ld)
            outs, outs_grad = [mem], [d_mem]
            if decay_grad:
                # The decay also enters through the prefix weights that formed this rank's entering states.
                outs.append(torch.einsum("gjh,jbhkv->gbhkv", weights[ids], mem_all).flatten(0, 1))
                outs_grad.append(d_in)
            grads = torch.autograd.grad(outs, [ks2, vs2] + ([ld] if decay_grad else []), outs_grad)
        dks = dks + grads[0]
        dvs = dvs + grads[1]
        if decay_grad:
            d_ld = (d_ld + grads[2]).to(log_decay.dtype)
        dq, dk, dv = (_unstack_chunks(x, n_loc) for x in (dqs, dks, dvs))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_ld, None, None, None, None, None


def lasp2_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                           group: dist.ProcessGroup | None = None, causal: bool = True,
                           layout: str = "contiguous") -> torch.Tensor:
    """Linear attention over a sequence sharded across the CP group, exchanging only memory states (LASP-2).

    Args:
        q, k: `[b, s_local, h, dk]`, this rank's tokens (`shard_sequence(x, layout=layout)`).
        v: `[b, s_local, h, dv]`.
        log_decay: `[h]`, log(lambda) <= 0 per head (identical on every rank), or None (lambda = 1). When it
            requires grad, each rank returns its own contribution to the gradient; the sum over the CP group
            (which the DP x CP gradient reduction forms) is the gradient of the whole sequence's loss.
        group: the CP group (default: the mesh's).
        causal: causal (with optional decay) or full non-causal linear attention (no decay).
        layout: "contiguous" (rank r holds chunk r of P) or "zigzag" (chunks r and 2P-1-r of 2P).
    Returns:
        `o` `[b, s_local, h, dv]` in v's dtype: this rank's rows of linear attention over the full sequence.

    Communication: one all-gather of `n_chunks * b * h * dk * dv` float32 per rank forward (n_chunks = 1
    contiguous, 2 zigzag), one of the same size backward, whatever the sequence length.
    """
    group = cp_group_or_default(group)
    rank, world = check_linear_sp_inputs("lasp2_linear_attention", q, k, v, log_decay, group, causal, layout)
    return _LASP2.apply(q, k, v, log_decay, group, causal, layout, rank, world)
