"""Packed-document metadata of one batch for one CP rank: built once per batch, read by every layer.

A packed batch carries `cu_seqlens` (int `[n_docs + 1]`): the document boundaries of its b sequences of S tokens
laid end to end (0 ... b * S, every sequence end a boundary), the same on every rank. Each CP rank holds the
tokens at global in-sequence positions `p` (`lctrain.parallel.sharding.shard_positions`: the one sharding
helper, zigzag or contiguous); a token's flat index is `f = row * S + p`, its document `j` the one with
`cu[j] <= f < cu[j + 1]`, and

    doc_ids    j                     (softmax masks: a query sees keys of its own document only)
    positions  f - cu[j]             (RoPE and the short convolution restart at every document)
    starts     f == cu[j]            (linear methods: the state restarts here, a -inf log gate)
    last       f == cu[j + 1] - 1    (its label is the next document's first token: not scored)

:meth:`PackedDocuments.from_host` builds all of it from the boundaries the loader already has on the host
(checked there, for free) and moves it to the device in ONE host-to-device copy, before the step. The SP
methods take the object through their `cu_seqlens=` argument; given a bare tensor instead (the public
contract), they derive the same object on the device with :meth:`PackedDocuments.on_device`, whose ops are
sync-free (searchsorted, gather, compare; never `isin`/`unique`/`nonzero`/boolean indexing, which sync on
CUDA). Other ranks' tokens (the keys of a ring step or an all-gathered block) get their document ids from
:meth:`PackedDocuments.ids_at`, the same sync-free lookup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lctrain.ops.attention_varlen import document_ids
from lctrain.parallel.sharding import LAYOUTS, shard_positions

__all__ = ["PackedDocuments", "as_documents", "check_boundaries", "token_tables"]


def check_boundaries(bounds: list[int], batch: int, seq_len: int) -> str | None:
    """What is wrong with host boundaries of `batch` sequences of `seq_len` laid end to end, or None."""
    total = batch * seq_len
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        return (f"cu_seqlens must run from 0 to batch * seq_len = {batch} * {seq_len} = {total}, "
                f"got {bounds[:1]} ... {bounds[-1:]}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        return "cu_seqlens must be strictly increasing (no empty documents)"
    missing = sorted(set(range(seq_len, total, seq_len)) - set(bounds))
    if missing:
        return (f"cu_seqlens must have a boundary at every sequence end (multiples of {seq_len}); "
                f"missing {missing[:4]}")
    return None


def token_tables(cu: torch.Tensor, token_positions: torch.Tensor, batch: int,
            seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(doc_ids, positions within the document, last-token flags), each `[b, n]`, of the tokens at global
    positions `token_positions` `[n]`: searchsorted and gathers on cu's device, no sync."""
    cu = cu.to(torch.int64)
    doc = document_ids(cu, batch, seq_len, token_positions)  # [b, s_local]
    rows = torch.arange(batch, device=cu.device, dtype=torch.int64)[:, None]
    within = rows * seq_len + token_positions[None, :] - cu[doc]
    return doc, within, within == cu[doc + 1] - cu[doc] - 1


@dataclass(eq=False)
class PackedDocuments:
    """One packed batch's documents as CP rank `rank` of `world` sees them (see the module docstring).

    Every tensor is on the activations' device; nothing here is read back by the host during the step.
    """

    cu_seqlens: torch.Tensor
    """int32/int64 `[n_docs + 1]`: global boundaries over the b sequences end to end (as the SP methods took it)."""
    batch: int
    """b: sequences in the batch."""
    seq_len: int
    """S: the global (un-sharded) sequence length."""
    rank: int
    """This rank's index in the CP group."""
    world: int
    """CP group size."""
    layout: str
    """How the sequence is sharded: "zigzag" or "contiguous"."""
    token_positions: torch.Tensor
    """int64 `[s_local]`: global in-sequence positions of this rank's tokens (`shard_positions`)."""
    doc_ids: torch.Tensor
    """int64 `[b, s_local]`: document index (into cu_seqlens) of each local token."""
    positions: torch.Tensor
    """int64 `[b, s_local]`: each local token's position within its document."""
    starts: torch.Tensor
    """bool `[b, s_local]`: the token is the first of its document (positions == 0)."""
    last: torch.Tensor
    """bool `[b, s_local]`: the token is the last of its document."""
    bounds: list[int] | None = None
    """The boundaries as host ints when built from the host (the per-document path reads them), else None."""

    @property
    def s_local(self) -> int:
        return self.seq_len // self.world

    @classmethod
    def from_host(cls, cu_seqlens: torch.Tensor | list[int], batch: int, seq_len: int, rank: int, world: int,
                  layout: str, device: torch.device | str) -> "PackedDocuments":
        """Build from host boundaries (a CPU tensor or ints): checked here, tables computed on the host, then ONE
        host-to-device copy (pinned, non-blocking on CUDA). Raises ValueError for bad boundaries."""
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.device.type != "cpu":
                raise ValueError(f"from_host needs the boundaries on the host, got a tensor on {cu_seqlens.device}")
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [n_docs + 1], got "
                                 f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
            bounds, dtype = cu_seqlens.tolist(), cu_seqlens.dtype
        else:
            bounds, dtype = [int(x) for x in cu_seqlens], torch.int64
        layout = "contiguous" if world == 1 else layout  # one rank: both layouts are the identity
        problem = check_boundaries(bounds, batch, seq_len) or _layout_problem(seq_len, world, layout)
        if problem:
            raise ValueError(problem)
        cu = torch.tensor(bounds, dtype=torch.int64)
        pos = shard_positions(seq_len, rank, world, layout)  # [s_local]
        doc, within, last = token_tables(cu, pos, batch, seq_len)
        n = len(bounds)
        host = torch.cat([cu, pos, doc.flatten(), within.flatten(), last.flatten().to(torch.int64)])
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
        s = pos.shape[0]
        doc_d, within_d, last_d = (buf[n + s + i * batch * s:n + s + (i + 1) * batch * s].view(batch, s)
                                   for i in range(3))
        return cls(buf[:n].to(dtype), batch, seq_len, rank, world, layout, buf[n:n + s], doc_d, within_d,
                   within_d == 0, last_d.bool(), bounds)

    @classmethod
    def on_device(cls, cu_seqlens: torch.Tensor, batch: int, seq_len: int, rank: int, world: int,
                  layout: str) -> "PackedDocuments":
        """Derive the same tables from boundaries already on the device, with sync-free ops only (values not
        checked: that would read them back; `lctrain.ops.debug` checks them in the SP methods)."""
        layout = "contiguous" if world == 1 else layout
        pos = shard_positions(seq_len, rank, world, layout, cu_seqlens.device)
        doc, within, last = token_tables(cu_seqlens, pos, batch, seq_len)
        return cls(cu_seqlens, batch, seq_len, rank, world, layout, pos, doc, within, within == 0, last)

    def ids_at(self, token_positions: torch.Tensor) -> torch.Tensor:
        """int64 `[b, n]` document ids of the tokens at global positions `[n]` (any rank's; searchsorted, no sync)."""
        if token_positions is self.token_positions:
            return self.doc_ids
        return document_ids(self.cu_seqlens, self.batch, self.seq_len, token_positions)

    def problem(self, q: torch.Tensor, rank: int, world: int, layout: str | None) -> str | None:
        """Why this object does not describe q `[b, s_local, ...]` on rank `rank` of `world` in `layout`, or None."""
        if self.cu_seqlens.device != q.device:
            return f"the packed documents are on {self.cu_seqlens.device}, q on {q.device}"
        if (self.batch, self.s_local, self.rank, self.world) != (q.shape[0], q.shape[1], rank, world):
            return (f"the packed documents were built for batch {self.batch}, {self.s_local} local tokens, rank "
                    f"{self.rank} of {self.world}; this call has batch {q.shape[0]}, {q.shape[1]} local tokens, "
                    f"rank {rank} of {world}")
        if layout is not None and world > 1 and layout != self.layout:
            return f"the packed documents were built for the {self.layout!r} layout, this call is {layout!r}"
        return None


def _layout_problem(seq_len: int, world: int, layout: str) -> str | None:
    if layout not in LAYOUTS:
        return f"unknown CP layout {layout!r}; expected one of {LAYOUTS}"
    parts = 2 * world if layout == "zigzag" else world
    return None if seq_len % parts == 0 else f"sequence length {seq_len} is not divisible by {parts} ({layout})"


def as_documents(cu_seqlens: "torch.Tensor | PackedDocuments", q: torch.Tensor, rank: int, world: int,
                 layout: str) -> PackedDocuments:
    """The call's documents: the object given (checked by the caller with `PackedDocuments.problem`), or one
    derived on the device from a bare `cu_seqlens` tensor (sync-free)."""
    if isinstance(cu_seqlens, PackedDocuments):
        return cu_seqlens
    return PackedDocuments.on_device(cu_seqlens, q.shape[0], q.shape[1] * world, rank, world, layout)
