"""Plumbing shared by the sequence-parallel methods: the once-per-signature input agreement, the log-sum-exp
merge.

The merge itself (`merge_attention`, float32 accumulation) lives with the local attention ops, which also
use it to split causal problems; it is re-exported here for the SP methods.

Input checks (:func:`agree_once`) run on every rank before a method's first collective. Each rank checks its
own inputs' metadata (shapes, dtypes, layout: host-side, free); then, the FIRST time a call signature
(method, group, shapes, dtypes, devices, layout, causal, ...) is seen, the ranks exchange it once (one small
object all-gather, counted as "all_gather_object"), so a rank with a bad shape cannot leave the others waiting
in a collective: every rank raises the same ValueError before any tensor is communicated. Signatures that
passed are cached, so in steady state an SP call issues nothing but its algorithm's collectives. The cache
assumes the ranks keep running the same program once they agreed on a signature (a later divergence is
caught by the process group's timeout, not by a ValueError). The exchange is skipped
- with env LCTRAIN_SP_CHECK_RANKS=0 (each rank then only checks its own inputs),
- on torch's "fake" backend or for FakeTensors (the planner's simulation: no data, no object collectives).
`clear_agreement_cache()` forgets every signature (the test harness calls it before each task).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

from lctrain.ops.attention_merge import merge_attention
from lctrain.ops.attention_ref import compute_dtype
from lctrain.ops.debug import debug_checks_enabled
from lctrain.parallel import comm
from lctrain.parallel.sharding import LAYOUTS, shard_positions
from lctrain.sp.documents import PackedDocuments

#: Optional per-method check: (q, k, v, cp) -> an error message or None.
ExtraCheck = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], "str | None"]

__all__ = ["compute_dtype", "resolve_scale", "agree_once", "check_inputs", "clear_agreement_cache",
           "merge_attention"]


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


_AGREED: dict[tuple, None] = {}
#: Distinct signatures remembered before the cache starts over (a run has a handful).
_MAX_AGREED = 4096


def clear_agreement_cache() -> None:
    """Forget every agreed signature: the next call of each signature exchanges it again."""
    _AGREED.clear()


def _skip_exchange(group: dist.ProcessGroup | None, tensors: tuple) -> bool:
    if os.environ.get("LCTRAIN_SP_CHECK_RANKS", "1") == "0" or comm.is_fake_group(group):
        return True
    return any(isinstance(t, FakeTensor) for t in tensors)


def agree_once(method: str, group: dist.ProcessGroup | None, problem: str | None,
               fields: tuple[tuple[str, object], ...], tensors: tuple = (), cache: bool = True,
               hint: Callable[[list[tuple]], str] | None = None) -> None:
    """Raise the same ValueError on every rank of `group` if any rank has a `problem` or the ranks' `fields` differ.

    Args:
        method: the SP function's name (starts every message).
        group: the CP group.
        problem: this rank's own input problem (None: fine); a function of `fields` only (host metadata).
        fields: (name, value) pairs that every rank must agree on; with `method` and `group` they are the
            signature that is exchanged once and then cached.
        tensors: the call's tensors (only inspected for FakeTensors).
        cache: False exchanges on every call (used while value checks, which depend on data, are on).
        hint: optional extra text for a disagreement, from every rank's field values.
    """
    cp = comm.group_size(group)
    key = (method, group, fields)
    if problem is None and cache and key in _AGREED:
        return
    if cp == 1 or _skip_exchange(group, tensors):
        if problem:
            raise ValueError(f"{method}: {problem}")
        return
    metas = comm.all_gather_object((problem, tuple(v for _, v in fields)), group)
    errors = [(r, m[0]) for r, m in enumerate(metas) if m[0]]
    if errors:
        raise ValueError(f"{method}: " + "; ".join(f"rank {r} of the CP group: {e}" for r, e in errors))
    values = [m[1] for m in metas]
    for i, (name, _) in enumerate(fields):
        per_rank = [v[i] for v in values]
        if any(x != per_rank[0] for x in per_rank):
            listed = ", ".join(f"rank {r}: {x}" for r, x in enumerate(per_rank))
            extra = hint(values) if hint is not None else ""
            raise ValueError(f"{method}: inputs differ between CP ranks: they disagree on {name} ({listed}){extra}")
    if cache:
        if len(_AGREED) >= _MAX_AGREED:
            _AGREED.clear()
        _AGREED[key] = None


def cu_seqlens_problem(cu_seqlens: "torch.Tensor | PackedDocuments | None", q: torch.Tensor, cp: int,
                       rank: int | None = None, layout: str | None = None) -> str | None:
    """What is wrong with a `cu_seqlens=` argument: a boundaries tensor or the batch's `PackedDocuments`
    (metadata; the boundaries' values only under debug checks)."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, PackedDocuments):
        problem = cu_seqlens.problem(q, cu_seqlens.rank if rank is None else rank, cp, layout)
        if problem is not None:
            return problem
        cu_seqlens = cu_seqlens.cu_seqlens
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        return "cu_seqlens must be a 1-D integer tensor [n_docs + 1] (0, ..., batch * seq_len)"
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        return f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}"
    if cu_seqlens.device != q.device:
        return f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}: pass it on q's device (once per batch)"
    if debug_checks_enabled():
        total = q.shape[0] * q.shape[1] * cp
        ends = torch.arange(0, total + 1, q.shape[1] * cp, device=cu_seqlens.device)
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((cu_seqlens.diff() < 0).any()):
            return f"cu_seqlens must rise from 0 to batch * seq_len = {total}, got {cu_seqlens.tolist()}"
        if not bool(torch.isin(ends, cu_seqlens).all()):
            return f"every sequence end {ends.tolist()} must be a document boundary, got {cu_seqlens.tolist()}"
    return None


def check_inputs(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                 causal: bool, layout: str | None, scale: float, extra: ExtraCheck | None = None,
                 cu_seqlens: "torch.Tensor | PackedDocuments | None" = None) -> None:
    """Raise the same ValueError on every rank of `group` when any rank's inputs are bad or ranks disagree.

    Called before the method's first collective; the agreement exchange happens once per signature (see the
    module docstring), whatever the local inputs, so no rank waits for one that raised.
    """
    cp = comm.group_size(group)
    problem = _local_problem(q, k, v, cp, layout, extra) or cu_seqlens_problem(cu_seqlens, q, cp,
                                                                                 comm.group_rank(group), layout)
    cu = cu_seqlens.cu_seqlens if isinstance(cu_seqlens, PackedDocuments) else cu_seqlens
    fields = (("q shape", tuple(q.shape)), ("k shape", tuple(k.shape)), ("v shape", tuple(v.shape)),
              ("q dtype", str(q.dtype)), ("k dtype", str(k.dtype)), ("v dtype", str(v.dtype)),
              ("device", q.device.type), ("causal", bool(causal)),
              ("layout", layout), ("softmax_scale", float(scale)),
              ("cu_seqlens", None if cu is None else str(cu.dtype)))
    # The document boundaries' values are data (they change every batch): checked only under debug checks, which
    # then also exchange on every call.
    agree_once(method, group, problem, fields, (q, k, v), cache=cu_seqlens is None or not debug_checks_enabled())


def rank_positions(rank: int, cp: int, s_local: int, layout: str, device: torch.device) -> torch.Tensor:
    """Global positions of the tokens rank `rank` holds, `[s_local]` (device arithmetic, no host sync)."""
    return shard_positions(s_local * cp, rank, cp, layout, device)


def rank_major_positions(cp: int, s_local: int, layout: str, device: torch.device) -> torch.Tensor:
    """Global positions of a rank-major gather of every rank's tokens, `[cp * s_local]`."""
    return torch.cat([rank_positions(r, cp, s_local, layout, device) for r in range(cp)])


def causal_work_per_rank(doc_lens: list[int], cp: int, layout: str = "zigzag",
                         per_document: bool = False) -> list[int]:
    """Visible (query, key) pairs each CP rank computes for one packed sequence of documents, causal.

    A query at offset i of its document sees i + 1 keys. `per_document=False`: the packed sequence is sharded
    as a whole (`layout`, document masks inside the attention); `per_document=True`: every document is cut into
    2*CP chunks and rank r takes chunks r and 2*CP-1-r of each (TransformerEngine's THD balance; each document
    padded to a multiple of 2*CP, padding not counted). Host-side planning arithmetic (no tensors).
    """
    work = [0] * cp
    if per_document:
        for n in doc_lens:
            c = -(-n // (2 * cp))
            for r in range(cp):
                for chunk in (r, 2 * cp - 1 - r):
                    lo, hi = chunk * c, min((chunk + 1) * c, n)
                    work[r] += sum(i + 1 for i in range(lo, hi))
        return work
    total = sum(doc_lens)
    parts = 2 * cp if layout == "zigzag" else cp
    if total % parts:
        raise ValueError(f"packed length {total} is not divisible by {parts}")
    c = total // parts
    offset = [i for n in doc_lens for i in range(n)]  # offset of every token in its document
    for chunk in range(parts):
        r = chunk if chunk < cp else 2 * cp - 1 - chunk
        if layout == "contiguous":
            r = chunk
        work[r] += sum(i + 1 for i in offset[chunk * c:(chunk + 1) * c])
    return work
