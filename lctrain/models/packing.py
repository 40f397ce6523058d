"""Packed documents in the model: the per-batch document tables, and how each SP method takes the packing.

A packed batch carries `cu_seqlens` (int `[n_docs + 1]`): the document boundaries of its b sequences laid
end to end (0 ... b * s; every sequence end is a boundary), the same on every rank. Once per batch the
model derives, for this CP rank's tokens (global in-sequence positions `p` from the sharding helper,
`position_ids()` / `shard_positions()`; flat index `f = row * s + p`, document `j` with
`cu[j] <= f < cu[j + 1]`):

    position in the document  f - cu[j]            (RoPE restarts at every document)
    last token of a document  f == cu[j + 1] - 1   (its label would be the next document's first token: not scored)

The tables are one `lctrain.sp.documents.PackedDocuments` (here `Documents`), built by the model once per
batch from the host boundaries; every mixer passes that object to its SP call as `cu_seqlens=` when the SP
function takes it (:func:`packed_argument`; else the boundaries tensor), so no layer derives anything from the
boundaries again and nothing reads a device tensor back. How the mixer takes the packing is decided once when
it is built (:func:`packed_mode`): "native" when the SP function takes `cu_seqlens=`; with one CP rank and an
SP function without it, "per_document": one call per document (exact, slower; the boundaries are read on the
host once per batch); otherwise packing is unsupported and the model raises NotImplementedError for a packed
batch.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from lctrain.sp.documents import PackedDocuments as Documents  # the per-batch tables every mixer receives
from lctrain.sp.documents import check_boundaries, token_tables


def takes_cu_seqlens(fn: Callable) -> bool:
    """Whether the SP function `fn` accepts the `cu_seqlens=` keyword."""
    try:
        return "cu_seqlens" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def takes_documents(fn: Callable) -> bool:
    """Whether `fn`'s `cu_seqlens=` takes the batch's `PackedDocuments` (lctrain's SP methods annotate it so);
    other functions (a user's or a test's SP method) get the boundaries tensor, as DESIGN.md specifies."""
    try:
        param = inspect.signature(fn).parameters.get("cu_seqlens")
    except (TypeError, ValueError):
        return False
    return param is not None and "PackedDocuments" in str(param.annotation)


def packed_argument(fn: Callable, docs: Documents) -> "Documents | torch.Tensor":
    """What a mixer passes as `fn(..., cu_seqlens=...)`: the tables themselves when `fn` takes them, else the
    boundaries tensor on the device."""
    return docs if takes_documents(fn) else docs.cu_seqlens


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
    problem = check_boundaries(cu_seqlens.tolist(), batch, seq_len)
    if problem:
        raise ValueError(problem)


def document_tables(cu_seqlens: torch.Tensor, position_ids: torch.Tensor, batch: int,
                    seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions within the document `[b, s_local]` and last-token flags `[b, s_local]` of this rank's tokens.

    Args:
        cu_seqlens: int `[n_docs + 1]`, global boundaries over `batch` sequences of `seq_len` end to end.
        position_ids: int64 `[s_local]`, this rank's global in-sequence positions (CP layout applied).
        batch: sequences in the batch.
        seq_len: global sequence length.
    """
    cu = cu_seqlens.to(position_ids.device)
    _, positions, last = token_tables(cu, position_ids.to(torch.int64), batch, seq_len)
    return positions, last


def per_document(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                 **kwargs) -> torch.Tensor:
    """`fn` on each document of a packed batch separately (one CP rank only): q, k, v `[b, s, h, d]`."""
    b, s = q.shape[:2]
    q, k, v = (t.reshape(1, b * s, *t.shape[2:]) for t in (q, k, v))  # [1, b*s, h, d]
    outs = [fn(q[:, a:e], k[:, a:e], v[:, a:e], **kwargs) for a, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1).reshape(b, s, *outs[0].shape[2:])
