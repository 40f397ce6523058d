"""Packed documents in the model: the per-batch document tables, and how each SP method takes the packing.

A packed batch carries `cu_seqlens` (int `[n_docs + 1]`): the document boundaries of its b sequences laid
end to end (0 ... b * s; every sequence end is a boundary), the same on every rank. Once per batch the
model derives, for this CP rank's tokens (global in-sequence positions `p` from the sharding helper,
`position_ids()` / `shard_positions()`; flat index `f = row * s + p`, document `j` with
`cu[j] <= f < cu[j + 1]`):

    position in the document  f - cu[j]            (RoPE restarts at every document)
    last token of a document  f == cu[j + 1] - 1   (its label would be the next document's first token: not scored)

Every mixer passes `cu_seqlens` to its SP call. How, is decided once when the mixer is built (:func:`packed_mode`):
"native" when the SP function takes `cu_seqlens=`; with one CP rank and an SP function without it,
"per_document": one call per document (exact, slower; the boundaries are read on the host once per batch);
otherwise packing is unsupported and the model raises NotImplementedError for a packed batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Documents:
    """One packed batch's document tables for this rank (built once per batch, shared by every layer)."""

    cu_seqlens: torch.Tensor
    """int `[n_docs + 1]`, global boundaries over the b sequences end to end, on the activations' device (as the
    SP methods take it)."""
    bounds: list[int] | None
    """The same boundaries as host ints, for the per-document path (None when no mixer needs them)."""
    positions: torch.Tensor
    """int64 `[b, s_local]`: each local token's position within its document."""
    last: torch.Tensor
    """bool `[b, s_local]`: the token is the last of its document."""


def takes_cu_seqlens(fn: Callable) -> bool:
    """Whether the SP function `fn` accepts the `cu_seqlens=` keyword."""
    try:
        return "cu_seqlens" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def packed_mode(fn: Callable, cp: int) -> str | None:
    """"native" (fn takes cu_seqlens), "per_document" (cp == 1: one call per document) or None (unsupported)."""
    if takes_cu_seqlens(fn):
        return "native"
    return "per_document" if cp == 1 else None


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """ValueError unless `cu_seqlens` are boundaries of `batch` sequences of `seq_len` laid end to end.

    The values are checked only for a CPU tensor (as the data pipeline makes it): no device sync.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [n_docs + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu":
        return
    cu = cu_seqlens.tolist()
    total = batch * seq_len
    if cu[0] != 0 or cu[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to batch * seq_len = {batch} * {seq_len} = {total}, "
                         f"got {cu[0]} ... {cu[-1]}")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
    missing = sorted(set(range(seq_len, total, seq_len)) - set(cu))
    if missing:
        raise ValueError(f"cu_seqlens must have a boundary at every sequence end (multiples of {seq_len}); "
                         f"missing {missing[:4]}")


def document_tables(cu_seqlens: torch.Tensor, position_ids: torch.Tensor, batch: int,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions within the document `[b, s_local]` and last-token flags `[b, s_local]` of this rank's tokens.

    Args:
        cu_seqlens: int `[n_docs + 1]`, global boundaries over `batch` sequences of `seq_len` end to end.
        position_ids: int64 `[s_local]`, this rank's global in-sequence positions (CP layout applied).
        batch: sequences in the batch.
        seq_len: global sequence length.
    """
    cu = cu_seqlens.to(device=position_ids.device, dtype=torch.int64)
    rows = torch.arange(batch, device=position_ids.device, dtype=torch.int64)[:, None]
    flat = rows * seq_len + position_ids.to(torch.int64)[None, :]  # [b, s_local]
    doc = torch.searchsorted(cu, flat, right=True) - 1  # [b, s_local]
    return flat - cu[doc], flat == cu[doc + 1] - 1


def per_document(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                 **kwargs) -> torch.Tensor:
    """`fn` on each document of a packed batch separately (one CP rank only): q, k, v `[b, s, h, d]`."""
    b, s = q.shape[:2]
    q, k, v = (t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v))  # [1, b*s, h, d]
    outs = [fn(q[:, a:e], k[:, a:e], v[:, a:e], **kwargs) for a, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).reshape(b, s, *outs[0].shape[2:])
