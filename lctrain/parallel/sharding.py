"""Sequence sharding across the CP group: contiguous and zigzag layouts.

contiguous: the sequence is cut into CP chunks, rank r holds chunk r.
zigzag:     the sequence is cut into 2*CP chunks, rank r holds chunks r and 2*CP-1-r, so with a causal
            mask every rank does the same amount of attention work (an early chunk and a late one).

`shard_sequence` slices a tensor every rank holds in full (no communication); `unshard_sequence` gathers
the local slices back into the full sequence (one all-gather).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from lctrain.parallel import comm
from lctrain.parallel.mesh import cp_group_or_default

Layout = Literal["zigzag", "contiguous"]
LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown CP layout {layout!r}; expected one of {LAYOUTS}")


def check_shardable(seq_len: int, cp: int, layout: str) -> None:
    """Raise a clear error when `seq_len` can't be split over `cp` ranks in `layout`."""
    check_layout(layout)
    parts = 2 * cp if layout == "zigzag" else cp
    if seq_len % parts:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {parts} "
            f"({'2*CP' if layout == 'zigzag' else 'CP'} with CP={cp}, layout={layout!r})"
        )


def chunk_ids(rank: int, cp: int, layout: str) -> list[int]:
    """Which chunks of the sequence a rank holds (of 2*cp for zigzag, of cp for contiguous)."""
    check_layout(layout)
    return [rank, 2 * cp - 1 - rank] if layout == "zigzag" else [rank]


def shard_positions(seq_len: int, rank: int, cp: int, layout: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (int64 `[seq_len // cp]`) of the tokens rank `rank` holds."""
    check_shardable(seq_len, cp, layout)
    n_chunks = 2 * cp if layout == "zigzag" else cp
    c = seq_len // n_chunks
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, cp, layout)])


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    group = cp_group_or_default(group)
    return comm.group_rank(group), comm.group_size(group)


def position_ids(seq_len: int, group: dist.ProcessGroup | None = None, layout: Layout = "zigzag",
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of this rank's tokens in the CP `group` (for RoPE, masks and labels)."""
    rank, cp = _rank_and_size(group)
    return shard_positions(seq_len, rank, cp, layout, device)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                   layout: Layout = "zigzag") -> torch.Tensor:
    """This rank's slice of the full tensor `x` along `dim` (no communication).

    Args:
        x: the full sequence, identical on every rank of `group`, e.g. `[b, s, h, d]`.
        group: the CP group (default: the mesh's CP group).
        dim: the sequence dimension.
        layout: "zigzag" (rank r gets chunks r and 2P-1-r of 2P) or "contiguous" (chunk r of P).
    Returns:
        `x` restricted to this rank's tokens, `s // P` long along `dim` (a copy for zigzag).
    """
    rank, cp = _rank_and_size(group)
    check_shardable(x.shape[dim], cp, layout)
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp if layout == "zigzag" else cp, dim=dim)
    parts = [chunks[i] for i in chunk_ids(rank, cp, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, layout):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        cp = comm.group_size(group)
        gathered = comm.all_gather(x, group=group, dim=dim)  # rank-major: [r0 parts, r1 parts, ...]
        if layout == "contiguous":
            return gathered
        pieces = gathered.chunk(2 * cp, dim=dim)  # rank r contributed pieces 2r (chunk r) and 2r+1 (chunk 2P-1-r)
        order = [None] * (2 * cp)
        for r in range(cp):
            order[r], order[2 * cp - 1 - r] = pieces[2 * r], pieces[2 * r + 1]
        return torch.cat(order, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        # The consumer of the full tensor is replicated across the group, so our slice of its gradient is ours.
        return shard_sequence(grad, ctx.group, ctx.dim, ctx.layout), None, None, None


def unshard_sequence(x_local: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                     layout: Layout = "zigzag") -> torch.Tensor:
    """Gather every rank's slice back into the full sequence (inverse of :func:`shard_sequence`).

    Differentiable: the backward returns this rank's slice of the incoming gradient (the consumer of the
    full tensor is taken to be replicated across the group, as in a test or a loss computed on every rank).
    """
    check_layout(layout)
    group = cp_group_or_default(group)
    if comm.group_size(group) == 1:
        return x_local
    if layout == "zigzag" and x_local.shape[dim] % 2:
        raise ValueError(f"zigzag slice length {x_local.shape[dim]} along dim {dim} is odd")
    return _Unshard.apply(x_local, group, dim, layout)
