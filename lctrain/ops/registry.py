"""Named compute backends with priorities: the dispatch shared by the softmax and linear attention ops.

Per call, the backend is the one forced -- by the call's `backend=` argument, else a `use(name)` block of
this thread, else the registry's environment variable -- or, when none is forced, the best registered
backend that is available in this process and whose `supports(...)` accepts the inputs. "Best" is the highest
priority, except on a GPU: there a backend that has not been validated on a GPU (`validated_on_gpu=False`:
it has never run and passed its tests and benchmark on one) ranks below every validated one, so a kernel only
checked under Triton's CPU interpreter cannot outrank flash-attn or PyTorch's fused kernels. Env
LCTRAIN_ALLOW_UNVALIDATED_GPU=1 lifts that (priority alone decides). A forced backend is used without asking
`supports` (it must be registered and available): that is how a kernel is run where it is not picked
automatically (Triton under TRITON_INTERPRET=1 on CPU, a GPU benchmark of an unvalidated kernel).

Modules that add backends (the Triton kernels) are imported on first use. A missing module is skipped; one
that fails to import is an error on a machine with a GPU (the kernels are what it came for) unless env
LCTRAIN_ALLOW_KERNEL_FALLBACK=1 allows falling back (then, and on CPU, a warning).

`track()` records which backends calls actually ran on (`lctrain bench sp` prints them).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Callable, Generic, Iterator, Protocol, TypeVar

import torch


class BackendRecord(Protocol):
    name: str
    priority: int
    validated_on_gpu: bool

    def supports(self, *case) -> bool: ...

    def available(self) -> bool: ...


B = TypeVar("B", bound=BackendRecord)


def always(*_args) -> bool:
    return True


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


#: Device types whose tensors count as GPU tensors for dispatch: "cuda", plus "meta" while a rehearsal runs
#: (`lctrain.rehearse` stands meta tensors in for the target GPU's, so backends dispatch as they would there).
_GPU_DEVICE_TYPES = {"cuda"}


def is_gpu_tensor(x: object) -> bool:
    """Whether `x` is a tensor on a GPU, as far as backend selection is concerned (the one place that decides:
    backends' `supports` and the validated-first rule ask here)."""
    return isinstance(x, torch.Tensor) and x.device.type in _GPU_DEVICE_TYPES


@contextlib.contextmanager
def meta_as_gpu() -> Iterator[None]:
    """Inside the block, meta tensors answer `is_gpu_tensor` as CUDA tensors would (the rehearsal's seam)."""
    added = "meta" not in _GPU_DEVICE_TYPES
    _GPU_DEVICE_TYPES.add("meta")
    try:
        yield
    finally:
        if added:
            _GPU_DEVICE_TYPES.discard("meta")


def _on_gpu(case: tuple) -> bool:
    return bool(case) and is_gpu_tensor(case[0])


class BackendRegistry(Generic[B]):
    """Backends of one kind of op, by name."""

    def __init__(self, kind: str, env_var: str, plugins: tuple[str, ...] = ()):
        self.kind, self.env_var, self.plugins = kind, env_var, plugins
        self._backends: dict[str, B] = {}
        self._forced = threading.local()
        self._trackers = threading.local()
        self._plugins_loaded = False

    def register(self, backend: B) -> None:
        """Add (or replace) `backend` under its name."""
        self._backends[backend.name] = backend

    def unregister(self, name: str) -> None:
        self._backends.pop(name, None)

    def backends(self) -> dict[str, B]:
        """Registered backends by name, highest priority first (after loading the plugin modules)."""
        self._load_plugins()
        return dict(sorted(self._backends.items(), key=lambda item: -item[1].priority))

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Force backend `name` for this thread's calls inside the block (None: automatic choice)."""
        old = getattr(self._forced, "name", None)
        self._forced.name = name
        try:
            yield
        finally:
            self._forced.name = old

    @contextlib.contextmanager
    def track(self) -> Iterator[list[str]]:
        """Collect the name of the backend every selection of this thread inside the block returned."""
        names: list[str] = []
        stack = getattr(self._trackers, "stack", None)
        if stack is None:
            stack = self._trackers.stack = []
        stack.append(names)
        try:
            yield names
        finally:
            stack.remove(names)

    def candidates(self, *case) -> list[B]:
        """Registered backends in the order automatic dispatch tries them for `case` (see module docstring)."""
        backends = list(self.backends().values())  # by priority
        if _on_gpu(case) and not _flag("LCTRAIN_ALLOW_UNVALIDATED_GPU"):
            # Stable sort: validated backends first, priority order within each group.
            backends.sort(key=lambda be: not getattr(be, "validated_on_gpu", False))
        return backends

    def select(self, *case, backend: str | None = None, describe: Callable[[], str] = str) -> B:
        """The backend that runs `case` (the arguments of the backends' `supports`; the first is the query).

        Raises:
            ValueError: a forced name is unknown or unavailable, or no backend supports the case.
        """
        chosen = self._select(case, backend, describe)
        for names in getattr(self._trackers, "stack", ()):
            names.append(chosen.name)
        return chosen

    def _select(self, case: tuple, backend: str | None, describe: Callable[[], str]) -> B:
        backends = self.backends()
        name = backend or getattr(self._forced, "name", None) or os.environ.get(self.env_var) or None
        if name is not None:
            if name not in backends:
                raise ValueError(f"unknown {self.kind} backend {name!r}; registered: {list(backends)}")
            if not backends[name].available():
                raise ValueError(f"{self.kind} backend {name!r} is not available in this process")
            return backends[name]
        for be in self.candidates(*case):
            if be.available() and be.supports(*case):
                return be
        raise ValueError(f"no {self.kind} backend supports {describe()}; registered: {list(backends)}")

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for mod in self.plugins:
            try:
                if importlib.util.find_spec(mod) is None:
                    continue
                importlib.import_module(mod)
            except Exception as err:  # noqa: BLE001 - reported below, loudly on a GPU machine
                msg = f"{self.kind} backend module {mod} failed to import: {err!r}"
                if torch.cuda.is_available() and not _flag("LCTRAIN_ALLOW_KERNEL_FALLBACK"):
                    self._plugins_loaded = False  # every call fails the same way, not just the first
                    raise RuntimeError(f"{msg}. This machine has a GPU, where the kernels are expected to run; "
                                       f"fix the install, or set LCTRAIN_ALLOW_KERNEL_FALLBACK=1 to fall back to "
                                       f"the other backends with a warning.") from err
                warnings.warn(msg + " (falling back to the other backends)")
