"""Plumbing shared by the softmax sequence-parallel methods: input checks, the log-sum-exp merge, layouts.

The merge itself (`merge_attention`, float32 accumulation) lives with the local attention ops, which also
use it to split causal problems; it is re-exported here for the SP methods.

Input checks run on every rank and end in one metadata exchange (an object all-gather, not counted as
payload), so a rank with a bad shape cannot leave the others waiting in a collective: every rank raises
the same ValueError before any tensor is communicated. Set LCTRAIN_SP_CHECK_RANKS=0 to skip the exchange
once a model's shapes are known to be consistent (each rank then only checks its own inputs).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from lctrain.ops.attention_merge import merge_attention
from lctrain.ops.attention_ref import compute_dtype
from lctrain.parallel import comm
from lctrain.parallel.sharding import LAYOUTS

#: Optional per-method check: (q, k, v, cp) -> an error message or None.
ExtraCheck = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], "str | None"]

__all__ = ["compute_dtype", "resolve_scale", "check_inputs", "merge_attention", "rank_major_to_global",
           "global_to_rank_major"]


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The softmax scale: the given one, else 1/sqrt(head_dim)."""
    return head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)


def _local_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int, layout: str | None,
                   extra: ExtraCheck | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        return f"unknown CP layout {layout!r}; expected one of {LAYOUTS}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"expected [batch, seq_local, heads, head_dim] tensors, got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree in batch, local sequence or head_dim"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})"
    if not (q.dtype == k.dtype == v.dtype):
        return f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"devices differ: q {q.device}, k {k.device}, v {v.device}"
    if q.shape[1] == 0:
        return "the local sequence is empty"
    if layout == "zigzag" and cp > 1 and q.shape[1] % 2:
        return (f"zigzag layout needs an even local sequence (two chunks per rank), got {q.shape[1]}: "
                f"the global sequence must be divisible by 2*CP = {2 * cp}")
    return extra(q, k, v, cp) if extra is not None else None


def check_inputs(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                 causal: bool, layout: str | None, scale: float, extra: ExtraCheck | None = None) -> None:
    """Raise the same ValueError on every rank of `group` when any rank's inputs are bad or ranks disagree.

    Called before the method's first collective; it always reaches the metadata exchange (when enabled),
    whatever the local inputs, so no rank waits for one that raised.
    """
    cp = comm.group_size(group)
    problem = _local_problem(q, k, v, cp, layout, extra)
    if cp == 1 or os.environ.get("LCTRAIN_SP_CHECK_RANKS", "1") == "0":
        if problem:
            raise ValueError(f"{method}: {problem}")
        return
    meta = (problem, tuple(q.shape), tuple(k.shape), tuple(v.shape), str(q.dtype), str(k.dtype), str(v.dtype),
            bool(causal), layout, float(scale))
    metas = comm.all_gather_object(meta, group)
    for r, m in enumerate(metas):
        if m[0]:
            raise ValueError(f"{method}: rank {r} of the CP group: {m[0]}")
    names = ("q shape", "k shape", "v shape", "q dtype", "k dtype", "v dtype", "causal", "layout", "softmax_scale")
    for i, name in enumerate(names, start=1):
        values = [m[i] for m in metas]
        if any(x != values[0] for x in values):
            per_rank = ", ".join(f"rank {r}: {x}" for r, x in enumerate(values))
            raise ValueError(f"{method}: ranks of the CP group disagree on {name} ({per_rank})")


def rank_major_to_global(x: torch.Tensor, cp: int, dim: int, layout: str) -> torch.Tensor:
    """Reorder a gathered tensor from rank order (rank r's shard at slot r) to global sequence order.

    zigzag: rank r holds chunks r and 2*cp-1-r, so the gathered pieces are [c0, c_{2P-1}, c1, c_{2P-2}, ...].
    contiguous: rank order is global order already.
    """
    if layout == "contiguous" or cp == 1:
        return x
    pieces = x.chunk(2 * cp, dim=dim)
    order = [pieces[2 * c] if c < cp else pieces[2 * (2 * cp - 1 - c) + 1] for c in range(2 * cp)]
    return torch.cat(order, dim=dim)


def global_to_rank_major(x: torch.Tensor, cp: int, dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`rank_major_to_global`."""
    if layout == "contiguous" or cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[i] for r in range(cp) for i in (r, 2 * cp - 1 - r)], dim=dim)
