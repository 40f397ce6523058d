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

`watch_collectives` wraps the functions of the `torch.distributed` namespace (so it counts what lctrain or
anyone else issues, independently of lctrain's own recorder) and the Work objects they return, so the order
of issue and wait is visible in `calls.events`. Not wrapped: `isend`/`irecv` (torch's P2POp insists on the
original functions; lctrain batches P2P through `batch_isend_irecv`, which is wrapped).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

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


@dataclass
class Collectives:
    """What `watch_collectives` saw: calls per function name and the ordered ("issue"|"wait", name) events."""

    counts: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)
    timed_waits: int = 0

    def clear(self) -> None:
        self.counts.clear()
        self.events.clear()
        self.timed_waits = 0


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
        out = fn(*args, **kwargs)
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
        return f"{func} with a boolean mask"
    if name == "aten::repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor) \
            and kwargs.get("output_size") is None and (func._overloadname == "Tensor" or isinstance(
                args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)):
        return f"{func} without output_size"
    if name in ("aten::_to_copy", "aten::to") and args and isinstance(args[0], torch.Tensor) \
            and args[0].device.type not in ("cpu", "meta") and str(kwargs.get("device", "")).startswith("cpu"):
        return f"{func} to the host"
    return None


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
