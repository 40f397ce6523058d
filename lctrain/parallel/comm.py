"""Counted collectives: every collective and point-to-point call of lctrain goes through this module.

Each call is recorded (kind, bytes this rank puts on the wire, group size) into the active
:class:`CommRecorder`s, so tests can assert what an algorithm promises (LASP-2: one all-gather forward,
one backward, size independent of the sequence length; ring: CP-1 K/V blocks per rank). Every blocking
wait carries a timeout, so a mismatched collective fails with a clear error instead of hanging.

Bytes are counted as the payload this rank contributes:
all_gather -> its input; reduce_scatter / all_reduce / all_to_all -> its input; send -> the tensor;
recv -> 0 (it is counted as the sender's). With no process group (a single process), calls are local
identities and are not recorded.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

#: Default seconds a blocking collective may wait (env LCTRAIN_COMM_TIMEOUT overrides).
DEFAULT_TIMEOUT_S = float(os.environ.get("LCTRAIN_COMM_TIMEOUT", "600"))


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: usually ranks disagree on the sequence of collectives."""


@dataclass(frozen=True)
class CommEvent:
    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | broadcast | send | recv
    bytes: int  # payload this rank contributes
    group_size: int
    tag: str = ""  # free-form label set with `comm_tag(...)`, e.g. "lasp2.fwd"


@dataclass
class CommRecorder:
    """Collects :class:`CommEvent`s while active (see :func:`record_comm`)."""

    events: list[CommEvent] = field(default_factory=list)

    def calls(self, op: str | None = None, tag: str | None = None) -> int:
        return sum(1 for e in self._select(op, tag))

    def bytes(self, op: str | None = None, tag: str | None = None) -> int:
        return sum(e.bytes for e in self._select(op, tag))

    def summary(self) -> dict[str, dict[str, int]]:
        """{op: {"calls": n, "bytes": b}} over everything recorded."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
        for e in self.events:
            out[e.op]["calls"] += 1
            out[e.op]["bytes"] += e.bytes
        return dict(out)

    def clear(self) -> None:
        self.events.clear()

    def _select(self, op: str | None, tag: str | None) -> Iterator[CommEvent]:
        for e in self.events:
            if (op is None or e.op == op) and (tag is None or e.tag.startswith(tag)):
                yield e


_state = threading.local()


def _recorders() -> list[CommRecorder]:
    if not hasattr(_state, "recorders"):
        _state.recorders = []
    return _state.recorders


@contextlib.contextmanager
def record_comm() -> Iterator[CommRecorder]:
    """Record every collective issued by this thread inside the block."""
    rec = CommRecorder()
    _recorders().append(rec)
    try:
        yield rec
    finally:
        _recorders().remove(rec)


@contextlib.contextmanager
def comm_tag(tag: str) -> Iterator[None]:
    """Label the collectives issued inside the block (nested tags join with '.')."""
    old = getattr(_state, "tag", "")
    _state.tag = f"{old}.{tag}" if old else tag
    try:
        yield
    finally:
        _state.tag = old


def _record(op: str, nbytes: int, group: ProcessGroup | None) -> None:
    recs = _recorders()
    if recs:
        ev = CommEvent(op, int(nbytes), group_size(group), getattr(_state, "tag", ""))
        for r in recs:
            r.events.append(ev)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group: ProcessGroup | None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def global_rank(group: ProcessGroup | None, group_rank_: int) -> int:
    """Global rank of the member `group_rank_` of `group`."""
    if not is_distributed():
        return 0
    return dist.get_global_rank(group, group_rank_) if group is not None else group_rank_


def _wait(work: dist.Work | None, op: str, group: ProcessGroup | None, timeout_s: float | None) -> None:
    if work is None:
        return
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as err:
        raise CollectiveTimeout(
            f"{op} on a group of {group_size(group)} ranks failed or did not finish within {timeout:.0f}s "
            f"(rank {dist.get_rank()}); the ranks probably disagree on the sequence of collectives: {err}"
        ) from err
    if ok is False:
        raise CollectiveTimeout(f"{op} on a group of {group_size(group)} ranks timed out after {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------- collectives


def all_gather(x: torch.Tensor, group: ProcessGroup | None = None, dim: int = 0,
               timeout_s: float | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` (same shape on all ranks) along `dim`, in group-rank order."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", _nbytes(x), group)
    _wait(dist.all_gather_into_tensor(out, x, group=group, async_op=True), "all_gather", group, timeout_s)
    if dim != 0:
        out = torch.cat(out.chunk(n, dim=0), dim=dim)
    return out


def all_gather_object(obj: object, group: ProcessGroup | None = None) -> list[object]:
    """Gather a small picklable object from every rank (metadata such as shapes; not counted as payload)."""
    n = group_size(group)
    if n == 1:
        return [obj]
    out: list[object] = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out


def reduce_scatter(x: torch.Tensor, group: ProcessGroup | None = None, dim: int = 0,
                   timeout_s: float | None = None) -> torch.Tensor:
    """Sum `x` over ranks and return this rank's `1/n` slice along `dim`."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    if dim != 0:
        x = torch.cat(x.chunk(n, dim=dim), dim=0)
    x = x.contiguous()
    out = torch.empty((x.shape[0] // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("reduce_scatter", _nbytes(x), group)
    if x.device.type == "cpu" and dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all_reduce, then keep our slice (same result, counted once).
        buf = x.clone()
        _wait(dist.all_reduce(buf, group=group, async_op=True), "reduce_scatter", group, timeout_s)
        out.copy_(buf.chunk(n, dim=0)[group_rank(group)])
    else:
        _wait(dist.reduce_scatter_tensor(out, x, group=group, async_op=True), "reduce_scatter", group, timeout_s)
    # With dim != 0 the chunks were stacked along dim 0, so our slice already has the shape of one chunk.
    return out


def all_reduce(x: torch.Tensor, group: ProcessGroup | None = None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               timeout_s: float | None = None) -> torch.Tensor:
    """In-place all-reduce of `x`; returns `x`."""
    if group_size(group) == 1:
        return x
    _record("all_reduce", _nbytes(x), group)
    _wait(dist.all_reduce(x, op=op, group=group, async_op=True), "all_reduce", group, timeout_s)
    return x


def all_to_all(x: torch.Tensor, group: ProcessGroup | None = None, scatter_dim: int = 0, gather_dim: int = 0,
               timeout_s: float | None = None) -> torch.Tensor:
    """Split `x` into n pieces along `scatter_dim`, send piece j to rank j, concatenate what arrives along `gather_dim`."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {n} ranks")
    inputs = [c.contiguous() for c in x.chunk(n, dim=scatter_dim)]
    outputs = [torch.empty_like(c) for c in inputs]
    _record("all_to_all", _nbytes(x), group)
    _wait(dist.all_to_all(outputs, inputs, group=group, async_op=True), "all_to_all", group, timeout_s)
    return torch.cat(outputs, dim=gather_dim)


def broadcast(x: torch.Tensor, src: int, group: ProcessGroup | None = None, timeout_s: float | None = None) -> torch.Tensor:
    """In-place broadcast of `x` from group rank `src`; returns `x`."""
    if group_size(group) == 1:
        return x
    _record("broadcast", _nbytes(x) if group_rank(group) == src else 0, group)
    _wait(dist.broadcast(x, src=global_rank(group, src), group=group, async_op=True), "broadcast", group, timeout_s)
    return x


def barrier(group: ProcessGroup | None = None, timeout_s: float | None = None) -> None:
    if group_size(group) == 1:
        return
    _wait(dist.barrier(group=group, async_op=True), "barrier", group, timeout_s)


# ---------------------------------------------------------------------------------------------- point to point


@dataclass
class P2POp:
    """One send (`peer` receives `tensor`) or receive (into `tensor` from `peer`); `peer` is a group rank."""

    op: str  # "send" | "recv"
    tensor: torch.Tensor
    peer: int


class P2PHandle:
    """In-flight batched P2P operations; :meth:`wait` blocks (with timeout) until all complete."""

    def __init__(self, works: Sequence[dist.Work], group: ProcessGroup | None, timeout_s: float | None):
        self._works, self._group, self._timeout_s = list(works), group, timeout_s

    def wait(self) -> None:
        for w in self._works:
            _wait(w, "send/recv", self._group, self._timeout_s)
        self._works = []


def batch_isend_irecv(ops: Sequence[P2POp], group: ProcessGroup | None = None,
                      timeout_s: float | None = None) -> P2PHandle:
    """Start a batch of sends and receives asynchronously (so compute can overlap them).

    Deadlock-safe for any ring size: all operations are posted at once (NCCL groups them; gloo runs
    every send/recv asynchronously), so no rank blocks on a send before posting its receive.
    """
    if not ops:
        return P2PHandle([], group, timeout_s)
    if not is_distributed():
        raise RuntimeError("batch_isend_irecv needs torch.distributed to be initialized")
    for o in ops:
        if o.op not in ("send", "recv"):
            raise ValueError(f"unknown P2P op {o.op!r}")
        _record(o.op, _nbytes(o.tensor) if o.op == "send" else 0, group)
    dist_ops = [
        dist.P2POp(dist.isend if o.op == "send" else dist.irecv, o.tensor, global_rank(group, o.peer), group)
        for o in ops
    ]
    return P2PHandle(dist.batch_isend_irecv(dist_ops), group, timeout_s)
