"""Counted collectives: every collective and point-to-point call of lctrain goes through this module.

Each call is recorded (kind, bytes this rank puts on the wire, group size) into the active
:class:`CommRecorder`s, so tests can assert what an algorithm promises (LASP-2: one all-gather forward,
one backward, size independent of the sequence length; ring: CP-1 K/V blocks per rank). Object
collectives (`all_gather_object`) are recorded too, as op "all_gather_object".

Waits are plain stream-ordered waits (`work.wait()`, never `wait(timeout=...)`): on NCCL they make the
current stream wait for the collective without blocking the host thread. Timeouts come from the process
group itself (`init_process_group(timeout=...)`, which `lctrain.parallel.mesh` and `lctrain.testing` pass):
gloo enforces it on CPU, the NCCL watchdog on GPU. A failed wait raises :class:`CollectiveTimeout` naming
the collective, the group size and the rank.

Bytes are counted as the payload this rank contributes:
all_gather -> its input; reduce_scatter / all_reduce / all_to_all -> its input; send -> the tensor;
recv -> 0 (it is counted as the sender's). With no process group (a single process), calls are local
identities and are not recorded.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
import pickle
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

def _all_gather_single(*args, **kwargs) -> dist.Work | None:
    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is a deprecated alias). Looked up per
    # call, so tools that wrap torch.distributed's functions (lctrain.testing) see it.
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args, **kwargs) -> dist.Work | None:
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: usually ranks disagree on the sequence of collectives."""


@dataclass(frozen=True)
class CommEvent:
    op: str  # all_gather | all_gather_object | reduce_scatter | all_reduce | all_to_all | broadcast | send | recv
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


def is_fake_group(group: ProcessGroup | None) -> bool:
    """Whether `group` belongs to torch's "fake" backend, for any device ("fake", or "meta:fake" as the
    rehearsal registers it: simulation, no data moves, object collectives return nothing)."""
    return is_distributed() and str(dist.get_backend(group)).split(":")[-1] == "fake"


def _wait(work: dist.Work | None, op: str, group: ProcessGroup | None) -> None:
    """Stream-ordered wait (on NCCL the host is not blocked); a failure (gloo's timeout) -> CollectiveTimeout."""
    if work is None:
        return
    try:
        work.wait()
    except RuntimeError as err:
        raise CollectiveTimeout(
            f"{op} on a group of {group_size(group)} ranks failed or did not finish within the process group's "
            f"timeout (rank {dist.get_rank()}); the ranks probably disagree on the sequence of collectives: {err}"
        ) from err


class Pending:
    """An asynchronous collective in flight; :meth:`wait` returns its result."""

    def __init__(self, work: dist.Work | None, op: str, group: ProcessGroup | None,
                 finish: Callable[[], torch.Tensor]):
        self._work, self._op, self._group, self._finish = work, op, group, finish

    def wait(self) -> torch.Tensor:
        _wait(self._work, self._op, self._group)
        self._work = None
        return self._finish()


# ---------------------------------------------------------------------------------------------- collectives


def all_gather(x: torch.Tensor, group: ProcessGroup | None = None, dim: int = 0,
               async_op: bool = False) -> "torch.Tensor | Pending":
    """Concatenate every rank's `x` (same shape on all ranks) along `dim`, in group-rank order.

    With `async_op=True` the collective is only started (and recorded): the returned :class:`Pending`'s
    `wait()` gives the result, so the caller can compute meanwhile.
    """
    n = group_size(group)
    if n == 1:
        return Pending(None, "all_gather", group, lambda: x) if async_op else x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", _nbytes(x), group)
    work = _all_gather_single(out, x, group=group, async_op=True)

    def finish() -> torch.Tensor:
        return out if dim == 0 else torch.cat(out.chunk(n, dim=0), dim=dim)

    pending = Pending(work, "all_gather", group, finish)
    return pending if async_op else pending.wait()


def all_gather_object(obj: object, group: ProcessGroup | None = None) -> list[object]:
    """Gather a small picklable object from every rank (metadata such as shapes).

    Recorded as op "all_gather_object" (bytes: the pickled size). Not for the hot path: it pickles, and on
    NCCL copies through the host. On the fake backend (simulation) it returns `[obj] * n`.
    """
    n = group_size(group)
    if n == 1:
        return [obj]
    _record("all_gather_object", len(pickle.dumps(obj)), group)
    if is_fake_group(group):
        return [obj] * n
    out: list[object] = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out


def reduce_scatter(x: torch.Tensor, group: ProcessGroup | None = None, dim: int = 0) -> torch.Tensor:
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
        _wait(dist.all_reduce(buf, group=group, async_op=True), "reduce_scatter", group)
        out.copy_(buf.chunk(n, dim=0)[group_rank(group)])
    else:
        _wait(_reduce_scatter_single(out, x, group=group, async_op=True), "reduce_scatter", group)
    # With dim != 0 the chunks were stacked along dim 0, so our slice already has the shape of one chunk.
    return out


def all_reduce(x: torch.Tensor, group: ProcessGroup | None = None,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `x`; returns `x`."""
    if group_size(group) == 1:
        return x
    _record("all_reduce", _nbytes(x), group)
    _wait(dist.all_reduce(x, op=op, group=group, async_op=True), "all_reduce", group)
    return x


def all_to_all_list(inputs: Sequence[torch.Tensor], group: ProcessGroup | None = None) -> list[torch.Tensor]:
    """Send `inputs[j]` to rank j (all the same shape); return what arrived, by source rank."""
    n = group_size(group)
    if len(inputs) != n:
        raise ValueError(f"all_to_all: {len(inputs)} pieces for {n} ranks")
    if n == 1:
        return [inputs[0]]
    inputs = [c.contiguous() for c in inputs]
    outputs = [torch.empty_like(c) for c in inputs]
    _record("all_to_all", sum(_nbytes(c) for c in inputs), group)
    _wait(dist.all_to_all(outputs, inputs, group=group, async_op=True), "all_to_all", group)
    return outputs


def all_to_all_pieces(x: torch.Tensor, group: ProcessGroup | None = None, scatter_dim: int = 0) -> list[torch.Tensor]:
    """Split `x` into n pieces along `scatter_dim`, send piece j to rank j; return what arrived, by source rank."""
    n = group_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by {n} ranks")
    return all_to_all_list(x.chunk(n, dim=scatter_dim), group)


def all_to_all(x: torch.Tensor, group: ProcessGroup | None = None, scatter_dim: int = 0,
               gather_dim: int = 0) -> torch.Tensor:
    """Split `x` into n pieces along `scatter_dim`, send piece j to rank j, concatenate what arrives along `gather_dim`."""
    pieces = all_to_all_pieces(x, group, scatter_dim)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=gather_dim)


def broadcast(x: torch.Tensor, src: int, group: ProcessGroup | None = None) -> torch.Tensor:
    """In-place broadcast of `x` from group rank `src`; returns `x`."""
    if group_size(group) == 1:
        return x
    _record("broadcast", _nbytes(x) if group_rank(group) == src else 0, group)
    _wait(dist.broadcast(x, src=global_rank(group, src), group=group, async_op=True), "broadcast", group)
    return x


def barrier(group: ProcessGroup | None = None) -> None:
    if group_size(group) == 1:
        return
    _wait(dist.barrier(group=group, async_op=True), "barrier", group)


# ---------------------------------------------------------------------------------------------- point to point


@dataclass
class P2POp:
    """One send (`peer` receives `tensor`) or receive (into `tensor` from `peer`); `peer` is a group rank."""

    op: str  # "send" | "recv"
    tensor: torch.Tensor
    peer: int


class P2PHandle:
    """In-flight batched P2P operations; :meth:`wait` waits (stream-ordered) until all complete."""

    def __init__(self, works: Sequence[dist.Work], group: ProcessGroup | None):
        self._works, self._group = list(works), group

    def wait(self) -> None:
        for w in self._works:
            _wait(w, "send/recv", self._group)
        self._works = []


def batch_isend_irecv(ops: Sequence[P2POp], group: ProcessGroup | None = None) -> P2PHandle:
    """Start a batch of sends and receives asynchronously (so compute can overlap them).

    Deadlock-safe for any ring size: all operations are posted at once (NCCL groups them; gloo runs
    every send/recv asynchronously), so no rank blocks on a send before posting its receive.
    """
    if not ops:
        return P2PHandle([], group)
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
    return P2PHandle(dist.batch_isend_irecv(dist_ops), group)
