"""Short causal depthwise convolution over a CP-sharded sequence (the q/k/v convolution of GatedDeltaNet / GLA).

    y_t = sum_{i=0}^{K-1} w_i * x_(t-K+1+i)        per channel, x_t = 0 before the sequence start

A token needs the K-1 tokens before it, so each chunk a rank holds needs the last K-1 tokens of the chunk
before it (its halo). Contiguous layout: rank r receives from rank r-1 and sends its tail to rank r+1.
Zigzag (rank r holds chunks r and 2P-1-r): chunk r's halo is the tail of chunk r-1 (rank r-1's first chunk)
and chunk 2P-1-r's halo is the tail of chunk 2P-2-r (rank r+1's second chunk; rank P-1's own first chunk), so a
rank talks to both neighbours. One batched, counted P2P exchange forward (tag "conv_halo.fwd"); backward sends
the halos' gradients back to their owners (tag "conv_halo.bwd"). Chunks must hold at least K-1 tokens.

Packed documents: with each token's position within its document p_t, tap i (reaching d = K-1-i tokens back) is
zeroed where d > p_t, so no token sees the previous document (halo tokens included: the mask is on the
receiving side, the exchange is unchanged).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.parallel.sharding import chunk_ids


def _halo_plan(rank: int, world: int, layout: str):
    """For each local chunk, where its halo comes from; and which local tails go to which rank.

    Returns (sources, sends): sources[j] is ("zero",), ("local", j') or ("recv", peer); sends is a list of
    (local chunk j, peer rank).
    """
    ids = chunk_ids(rank, world, layout)
    owner = {c: (r, j) for r in range(world) for j, c in enumerate(chunk_ids(r, world, layout))}
    sources, sends = [], []
    for j, c in enumerate(ids):
        if c == 0:
            sources.append(("zero",))
        else:
            r, jj = owner[c - 1]
            sources.append(("local", jj) if r == rank else ("recv", r))
        if c + 1 in owner and owner[c + 1][0] != rank:
            sends.append((j, owner[c + 1][0]))
    return sources, sends


class _HaloExchange(torch.autograd.Function):
    """x `[b, s_local, ch]` -> halos `[n_loc, b, width, ch]` (the `width` tokens before each local chunk)."""

    @staticmethod
    def forward(ctx, x, width, group, layout, rank, world):
        ids = chunk_ids(rank, world, layout)
        chunks = x.chunk(len(ids), dim=1)
        sources, sends = _halo_plan(rank, world, layout)
        halos = [torch.zeros_like(chunks[0][:, :width]) for _ in ids]
        ops = [P2POp("send", chunks[j][:, -width:].contiguous(), peer) for j, peer in sends]
        for j, src in enumerate(sources):
            if src[0] == "local":
                halos[j] = chunks[src[1]][:, -width:].clone()
            elif src[0] == "recv":
                halos[j] = torch.empty_like(halos[j])
                ops.append(P2POp("recv", halos[j], src[1]))
        if ops:
            with comm.comm_tag("conv_halo.fwd"):
                comm.batch_isend_irecv(ops, group).wait()
        ctx.width, ctx.group, ctx.layout, ctx.rank, ctx.world = width, group, layout, rank, world
        ctx.shape = x.shape
        return torch.stack(halos)

    @staticmethod
    def backward(ctx, d_halo):
        ids = chunk_ids(ctx.rank, ctx.world, ctx.layout)
        sources, sends = _halo_plan(ctx.rank, ctx.world, ctx.layout)
        w = ctx.width
        dx = d_halo.new_zeros(ctx.shape)
        d_chunks = list(dx.chunk(len(ids), dim=1))  # views of dx
        ops, received = [], []
        for j, src in enumerate(sources):
            if src[0] == "local":
                d_chunks[src[1]][:, -w:] += d_halo[j]
            elif src[0] == "recv":
                ops.append(P2POp("send", d_halo[j].contiguous(), src[1]))
        for j, peer in sends:
            buf = torch.empty_like(d_halo[0])
            received.append((j, buf))
            ops.append(P2POp("recv", buf, peer))
        if ops:
            with comm.comm_tag("conv_halo.bwd"):
                comm.batch_isend_irecv(ops, ctx.group).wait()
        for j, buf in received:
            d_chunks[j][:, -w:] += buf
        return dx, None, None, None, None, None


def causal_conv_cp(x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup | None, layout: str,
                   rank: int, world: int, doc_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution of this rank's tokens of a CP-sharded sequence.

    Args:
        x: `[b, s_local, ch]`, this rank's tokens in `layout`.
        weight: `[ch, K]` (tap K-1 multiplies the current token).
        group, layout, rank, world: the CP group, its layout, this rank and the group size.
        doc_positions: int `[b, s_local]`, each token's position within its packed document
            (`lctrain.models.packing.Documents.positions`), or None (one document per sequence).
    Returns:
        `[b, s_local, ch]`: the convolution of the whole sequence at this rank's tokens.

    Raises:
        ValueError: a chunk is shorter than K-1 tokens.
    """
    kernel = weight.shape[-1]
    n_loc = len(chunk_ids(rank, world, layout))
    chunk = x.shape[1] // n_loc
    width = kernel - 1
    if width == 0:
        return x * weight[:, 0]
    taps = None
    if doc_positions is not None:
        back = torch.arange(width, -1, -1, device=x.device)  # tap i reaches d = K-1-i tokens back
        taps = (back <= doc_positions[..., None]).to(x.dtype)  # [b, s_local, K]
    if n_loc == 1 and world == 1:  # the whole sequence here: zeros before it, any length
        halos = x.new_zeros(1, x.shape[0], width, x.shape[2])
    elif chunk < width:
        raise ValueError(f"the short convolution (kernel {kernel}) needs chunks of at least {width} tokens; "
                         f"this rank's chunks hold {chunk} (use a longer sequence or a smaller kernel)")
    else:
        halos = _HaloExchange.apply(x, width, group, layout, rank, world)  # [n_loc, b, width, ch]
    outs = []
    for j, xc in enumerate(x.chunk(n_loc, dim=1)):
        if taps is not None:
            windows = torch.cat([halos[j], xc], dim=1).unfold(1, kernel, 1)  # [b, chunk, ch, K]
            mask = taps[:, j * chunk:(j + 1) * chunk, None, :]  # [b, chunk, 1, K]
            outs.append((windows * mask * weight).sum(-1))
            continue
        xin = torch.cat([halos[j], xc], dim=1).transpose(1, 2)  # [b, ch, width + chunk]
        outs.append(F.conv1d(xin, weight[:, None, :], groups=weight.shape[0]).transpose(1, 2))  # [b, chunk, ch]
    return torch.cat(outs, dim=1)
