"""Watch the hot path: host syncs, the collectives issued on torch.distributed itself, saved activations.

Context managers for tests and benchmarks (the first two patch process-wide and restore on exit; not
thread-safe):

    with count_host_syncs() as syncs:        # Tensor.item / __bool__ / tolist / __int__ / __float__ /
        step()                               # __index__ / numpy, .cpu() of a device tensor,
    assert syncs.count == 0, syncs.calls     # torch.cuda.synchronize, Work.wait(timeout=...)

    with watch_collectives() as calls:       # every torch.distributed collective function, by name
        step()
    assert calls.counts == {"all_gather_single": 1}

    with track_saved_tensors(exclude=(q, k, v)) as saved:   # autograd's saved tensors, by storage
        o = layer(q, k, v)
    saved.bytes                              # what the layer keeps for backward
    graph_saved_bytes(o)                     # the same, walking the graph (sees nested hooks too)

    with count_syncing_ops() as ops:         # aten ops whose CUDA kernel waits for the device (SYNCING_OPS),
        step()                               # seen by a dispatch mode on any device (CPU and meta included)
    assert ops.count == 0, ops.calls         # "aten.isin.Tensor_Tensor at lctrain/sp/x.py:12", ...

    with watch_syncing_ops() as found:       # count_syncing_ops' deny-list on device (meta/cuda) tensors,
        step()                               # plus device-to-host copies; each with its source line (the
    assert not found, found                  # rehearsal's sync watcher)

`watch_collectives` wraps the functions of the `torch.distributed` namespace (so it counts what lctrain or
anyone else issues, independently of lctrain's own recorder) and the Work objects they return, so the order
of issue and wait is visible in `calls.events`. Not wrapped: `isend`/`irecv` (torch's P2POp insists on the
original functions; lctrain batches P2P through `batch_isend_irecv`, which is wrapped).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods that copy a device value to the host (and so wait for the device).
HOST_SYNC_METHODS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy")

#: torch.distributed functions counted by `watch_collectives`.
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce",
               "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_to_all", "all_to_all_single",
               "broadcast", "broadcast_object_list", "barrier", "batch_isend_irecv", "send", "recv", "reduce",
               "gather", "scatter", "gather_object", "scatter_object_list")

#: aten ops whose CUDA implementation copies a device value to the host (so the host waits for the device):
#: the deny-list of the hot path, in one place (the rehearsal's sync watcher uses it too). `isin` switches to a
#: sort + unique path on CUDA once the test elements exceed ~10 * n^0.145; the others always sync.
SYNCING_OPS = frozenset({
    "aten::isin", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::nonzero", "aten::argwhere", "aten::masked_select", "aten::bincount",
    "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::histogram",
})
#: Ops that sync only with some arguments: a bool/uint8 index (boolean-mask indexing runs `nonzero`), and
#: `repeat_interleave` with tensor repeats and no `output_size` (it reads the repeats' sum).
_MASK_INDEX_OPS = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})

_MISSING = object()


@dataclass
class HostSyncs:
    """What `count_host_syncs` saw: one name per sync, in order."""

    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


@dataclass(frozen=True)
class CollectiveCall:
    """One torch.distributed call: function, group (None: the default group), the bytes this rank contributes,
    the device types of its tensors and the source line that issued it."""

    name: str
    group: Any
    bytes: int
    devices: tuple[str, ...]
    line: str


@dataclass
class Collectives:
    """What `watch_collectives` saw: calls per function name, the ordered ("issue"|"wait", name) events and one
    :class:`CollectiveCall` per call."""

    counts: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)
    timed_waits: int = 0
    calls: list[CollectiveCall] = field(default_factory=list)

    def clear(self) -> None:
        self.counts.clear()
        self.events.clear()
        self.calls.clear()
        self.timed_waits = 0


class CollectiveOnHostTensor(RuntimeError):
    """A collective got a CPU tensor on a group whose backend has none for CPU (NCCL's "No backend type associated
    with device type cpu"); the message names the source line."""


#: Path fragments of frames that are plumbing, not the code that asked for an op (skipped by `source_line`).
_PLUMBING = ("/torch/", "/lctrain/testing/hot_path.py", "/lctrain/rehearse/watch.py", "/lctrain/rehearse/rehearsal.py",
             "/lctrain/rehearse/world.py", "/contextlib.py", "/functools.py", "<frozen ", "/typing.py")


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/lctrain/", "/kernels/", "/tests/", "/launch/"):
        if marker in path:
            head = "" if marker == "/site-packages/" else marker.strip("/") + "/"
            return head + path.rsplit(marker, 1)[1]
    return path


def source_line(skip: tuple[str, ...] = ()) -> str:
    """`file:line` of the innermost caller that is not torch or watcher plumbing (nor a path fragment in `skip`)."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename.replace("\\", "/")
        if not any(p in name for p in _PLUMBING + skip):
            return f"{_short_path(name)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if hasattr(x, "tensor") and hasattr(x, "op"):  # a P2POp
        return [x.tensor]
    return []


def _payload(name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors this rank contributes to collective `name` (as lctrain.parallel.comm counts bytes)."""
    if name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
                "all_gather", "reduce_scatter", "all_to_all", "all_to_all_single"):
        return _tensors(args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input")))
    if name == "batch_isend_irecv":
        return [op.tensor for op in (args[0] if args else kwargs.get("p2p_op_list", [])) if op.op is dist.isend]
    return _tensors(args[0] if args else kwargs.get("tensor"))


class _Patches:
    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING) if isinstance(owner, type)
                            else getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._saved.clear()


class _WatchedWork:
    """A Work that reports its waits (and whether they carry a host-blocking timeout)."""

    def __init__(self, work: Any, name: str, watch: Collectives, syncs: HostSyncs | None):
        self._work, self._name, self._watch, self._syncs = work, name, watch, syncs

    def wait(self, timeout: Any = None) -> Any:
        self._watch.events.append(("wait", self._name))
        if timeout is not None:
            self._watch.timed_waits += 1
            if self._syncs is not None:
                self._syncs.calls.append(f"Work.wait(timeout=...) of {self._name}")
            return self._work.wait(timeout)
        return self._work.wait()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._work, attr)


def _wrap_collective(fn: Callable, name: str, watch: Collectives, syncs: HostSyncs | None) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        watch.counts[name] = watch.counts.get(name, 0) + 1
        watch.events.append(("issue", name))
        payload = _payload(name, args, kwargs)
        line = source_line(skip=("/lctrain/parallel/comm.py", "/torch/distributed/"))
        group = kwargs.get("group")
        if group is None and name == "batch_isend_irecv" and args and args[0]:
            group = args[0][0].group
        watch.calls.append(CollectiveCall(name, group, sum(t.numel() * t.element_size() for t in payload),
                                          tuple(sorted({t.device.type for t in _tensors(args) + _tensors(
                                              list(kwargs.values()))})), line))
        try:
            out = fn(*args, **kwargs)
        except RuntimeError as err:
            if "No backend type associated with device type" in str(err):
                exc = CollectiveOnHostTensor(f"{name} on a CPU tensor at {line}: the process group has no backend "
                                             f"for CPU tensors (NCCL's error: {err})")
                exc.line = line
                raise exc from err
            raise
        if isinstance(out, list):
            return [_WatchedWork(w, name, watch, syncs) for w in out]
        return None if out is None else _WatchedWork(out, name, watch, syncs)
    return wrapper


@contextlib.contextmanager
def watch_collectives(_syncs: HostSyncs | None = None) -> Iterator[Collectives]:
    """Count every call of a torch.distributed collective function inside the block (see module docstring)."""
    watch = Collectives()
    patches = _Patches()
    try:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                patches.set(dist, name, _wrap_collective(fn, name, watch, _syncs))
        yield watch
    finally:
        patches.restore()


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count host syncs inside the block: value reads of tensors, device synchronize, timed Work waits."""
    syncs = HostSyncs()
    patches = _Patches()

    def counting(name: str, orig: Callable) -> Callable:
        @functools.wraps(orig)
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            syncs.calls.append(f"Tensor.{name}")
            return orig(self, *args, **kwargs)
        return wrapper

    def cpu_copy(orig: Callable) -> Callable:
        @functools.wraps(orig)
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.device.type not in ("cpu", "meta"):
                syncs.calls.append("Tensor.cpu")
            return orig(self, *args, **kwargs)
        return wrapper

    def cuda_sync(orig: Callable) -> Callable:
        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            syncs.calls.append("torch.cuda.synchronize")
            return orig(*args, **kwargs)
        return wrapper

    try:
        for name in HOST_SYNC_METHODS:
            orig = getattr(torch.Tensor, name, None)
            if orig is not None:
                patches.set(torch.Tensor, name, counting(name, orig))
        patches.set(torch.Tensor, "cpu", cpu_copy(torch.Tensor.cpu))
        patches.set(torch.cuda, "synchronize", cuda_sync(torch.cuda.synchronize))
        with watch_collectives(syncs):
            yield syncs
    finally:
        patches.restore()


def syncing_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why the aten op `func(*args, **kwargs)` would sync the host on CUDA, or None (see `SYNCING_OPS`)."""
    name = func._schema.name
    if name in SYNCING_OPS:
        return str(func)
    if name in _MASK_INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        if name != "aten::index" and _masked_fill_path(args, kwargs):
            return None
        return f"{func} with a boolean mask"
    if name == "aten::repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) \
            and kwargs.get("output_size") is None and (func._overloadname == "Tensor" or isinstance(
                args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)):
        return f"{func} without output_size"
    if name in ("aten::_to_copy", "aten::to") and args and isinstance(args[0], torch.Tensor) \
            and args[0].device.type not in ("cpu", "meta") and str(kwargs.get("device", "")).startswith("cpu"):
        return f"{func} to the host"
    return None


def _masked_fill_path(args: tuple, kwargs: dict) -> bool:
    """`x[mask] = scalar`: aten's index_put takes its masked_fill path (no nonzero, no sync) for one mask index,
    a one-element value on the host (a Python scalar) and no accumulation."""
    indices = [i for i in args[1] if i is not None]
    value = args[2] if len(args) > 2 else kwargs.get("values")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    return (len(indices) == 1 and not accumulate and isinstance(value, torch.Tensor) and value.numel() == 1
            and value.device.type == "cpu")


def _caller() -> str:
    """The innermost stack frame outside torch and this module, as `path:line`."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and not f.endswith("testing/hot_path.py") and "/contextlib.py" not in f:
            return f"{f}:{frame.lineno}"
    return "?"


@dataclass
class SyncingOps:
    """What `count_syncing_ops` saw: "op at path:line" per syncing op, in order."""

    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


@contextlib.contextmanager
def count_syncing_ops() -> Iterator[SyncingOps]:
    """Record every aten op inside the block whose CUDA kernel would sync the host (`syncing_reason`).

    A `TorchDispatchMode`, so it sees the ops whatever the device (CPU, meta, fake) and whatever issued them,
    forward and backward (autograd runs backward ops under the same mode when backward is called inside the
    block). It does not see ops inside a custom op's kernel, nor Python-level host reads (`count_host_syncs`).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = SyncingOps()

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            reason = syncing_reason(func, args, kwargs)
            if reason is not None:
                seen.calls.append(f"{reason} at {_caller()}")
            return func(*args, **kwargs)

    with _Watch():
        yield seen


@dataclass
class SavedTensors:
    """What `track_saved_tensors` saw: bytes of every distinct storage autograd saved for backward."""

    storages: dict[int, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _storage(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # fake / meta tensors have no data pointer
        return id(t), t.numel() * t.element_size()


@contextlib.contextmanager
def track_saved_tensors(exclude: tuple[torch.Tensor, ...] = ()) -> Iterator[SavedTensors]:
    """Record the tensors autograd saves for backward inside the block (`torch.autograd.graph.saved_tensors_hooks`).

    Each storage counts once, in full (a saved view keeps its whole storage alive); storages of `exclude`
    (e.g. the layer's own inputs, which are alive anyway) do not count. What a forward leaves behind for its
    backward, i.e. the activation memory of one layer.
    """
    rec = SavedTensors()
    skip = {_storage(t)[0] for t in exclude}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage(t)
        if key not in skip:
            rec.storages[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield rec


def graph_saved_bytes(*outputs: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph behind `outputs` keeps for backward.

    Walks the graph (every node's `_saved_*` tensors; custom Functions' `saved_tensors`) and follows saved
    tensors that carry graphs of their own (a Function that keeps an inner graph, as LASP-2 does). Unlike
    :func:`track_saved_tensors` it also sees tensors saved under other saved-tensor hooks (nested hooks hide
    them from outer ones). Call it after forward, before backward frees the graph.
    """
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        saved: list[Any] = []
        for name in dir(fn):
            if name.startswith("_saved_"):
                try:
                    saved.append(getattr(fn, name))
                except RuntimeError:  # already freed
                    pass
        if hasattr(fn, "saved_tensors"):
            try:
                saved.extend(fn.saved_tensors)
            except RuntimeError:
                pass
        for item in saved:
            for t in (item if isinstance(item, (tuple, list)) else (item,)):
                if isinstance(t, torch.Tensor):
                    key, nbytes = _storage(t)
                    storages[key] = nbytes
                    if t.grad_fn is not None:
                        stack.append(t.grad_fn)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return sum(storages.values())


@dataclass(frozen=True)
class SyncingOp:
    """One syncing op seen by :func:`watch_syncing_ops`: the op, why it syncs (`syncing_reason`), the source line."""

    op: str
    why: str
    line: str


def _device_to_host(func: Any, args: tuple, kwargs: dict, device_types: tuple[str, ...]) -> str | None:
    name = func._schema.name
    if name in ("aten::_to_copy", "aten::to") and args and isinstance(args[0], torch.Tensor) \
            and args[0].device.type in device_types and str(kwargs.get("device", "")).startswith("cpu"):
        return f"{func} to the host"
    if name == "aten::copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
            and args[1].device.type in device_types and args[0].device.type == "cpu":
        return f"{func} to the host"
    return None


def _placeholder(func: Any, args: tuple, kwargs: dict) -> Any:
    """A stand-in result for a syncing op on meta tensors, which cannot compute it (so a rehearsal goes on): a scalar
    read gives False / 0 / 1.0 (floats are usually counts or norms that get divided by), a copy to the host zeros,
    data-dependent sizes their largest value; NotImplemented when there is none (the op then runs, and raises)."""
    name = func._overloadpacket.__name__
    x = args[0] if args else None
    if name in ("_local_scalar_dense", "is_nonzero", "equal", "allclose"):
        if name != "_local_scalar_dense" or x.dtype == torch.bool:
            return False
        return 1.0 if x.dtype.is_floating_point else 0
    if name in ("_to_copy", "to"):
        return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype, device="cpu")
    if name == "copy_":
        return args[0]
    if name in ("nonzero", "argwhere"):
        return torch.empty((x.numel(), x.dim()), dtype=torch.int64, device=x.device)
    if name == "masked_select":
        return torch.empty((x.numel(),), dtype=x.dtype, device=x.device)
    if name == "isin":
        return torch.empty(x.shape, dtype=torch.bool, device=x.device)
    if name in ("_unique", "_unique2", "unique_consecutive"):
        flat = torch.empty((x.numel(),), dtype=x.dtype, device=x.device)
        inverse = torch.empty(x.shape, dtype=torch.int64, device=x.device)
        counts = torch.empty((x.numel(),), dtype=torch.int64, device=x.device)
        return (flat, inverse) if name == "_unique" else (flat, inverse, counts)
    return NotImplemented


def _meta_scalar_fill(func: Any, args: tuple, kwargs: dict) -> bool:
    """`x[mask] = scalar` on meta: Python indexing puts the scalar on the host for a CUDA `x` (so aten takes the
    masked_fill path, no sync) but on `x`'s device for meta; judge it as on CUDA."""
    if func._schema.name not in _MASK_INDEX_OPS or func._schema.name == "aten::index" or len(args) < 3:
        return False
    value = args[2]
    if not (isinstance(value, torch.Tensor) and value.device.type == "meta" and value.dim() == 0):
        return False
    return _masked_fill_path((args[0], args[1], value.new_empty((), device="cpu")) + tuple(args[3:]), kwargs)


class _SyncingOpsMode(TorchDispatchMode):
    def __init__(self, found: list[SyncingOp], device_types: tuple[str, ...],
                 on_sync: Callable[[SyncingOp], None] | None):
        super().__init__()
        self.found, self.device_types, self.on_sync = found, device_types, on_sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(t.device.type in self.device_types for t in _tensors(list(args)))
        why = (syncing_reason(func, args, kwargs) if on_device else None) or \
            _device_to_host(func, args, kwargs, self.device_types)
        if why is not None and _meta_scalar_fill(func, args, kwargs):
            why = None
        if why is not None:
            seen = SyncingOp(func._overloadpacket.__name__, why, source_line())
            self.found.append(seen)
            if self.on_sync is not None:
                self.on_sync(seen)
            if any(t.device.type == "meta" for t in _tensors(list(args))):
                out = _placeholder(func, args, kwargs)
                if out is not NotImplemented:
                    return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def watch_syncing_ops(device_types: tuple[str, ...] = ("cuda", "meta"),
                      on_sync: Callable[[SyncingOp], None] | None = None) -> Iterator[list[SyncingOp]]:
    """`count_syncing_ops` for device tensors, as the rehearsal needs it: the same deny-list (`syncing_reason`),
    counted only for ops on tensors of `device_types` ("meta" stands in for the GPU; a CPU tensor's value is on the
    host already), plus device-to-host copies; each with its source line (`source_line`).

    On meta tensors a scalar read returns 0 (1.0 for floats, False for bools) and data-dependent shapes take their
    largest value, so the code goes on and every sync of a step is listed, not only the first. `on_sync` is called at
    once for each (the rehearsal decides there whether it is a failure).
    """
    found: list[SyncingOp] = []
    with _SyncingOpsMode(found, device_types, on_sync):
        yield found
