"""Named compute backends with priorities: the dispatch shared by the softmax and linear attention ops.

Per call, the backend is the one forced -- by the call's `backend=` argument, else a `use(name)` block of
this thread, else the registry's environment variable -- or, when none is forced, the highest-priority
registered backend that is available in this process and whose `supports(...)` accepts the inputs.
A forced backend is used without asking `supports` (it must be registered and available): that is how a
kernel is run where it is not picked automatically (Triton under TRITON_INTERPRET=1 on CPU, say).
Modules that add backends (the Triton kernels) are imported on first use, and a broken optional backend
only warns.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Callable, Generic, Iterator, Protocol, TypeVar


class BackendRecord(Protocol):
    name: str
    priority: int

    def supports(self, *case) -> bool: ...

    def available(self) -> bool: ...


B = TypeVar("B", bound=BackendRecord)


def always(*_args) -> bool:
    return True


class BackendRegistry(Generic[B]):
    """Backends of one kind of op, by name."""

    def __init__(self, kind: str, env_var: str, plugins: tuple[str, ...] = ()):
        self.kind, self.env_var, self.plugins = kind, env_var, plugins
        self._backends: dict[str, B] = {}
        self._forced = threading.local()
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

    def select(self, *case, backend: str | None = None, describe: Callable[[], str] = str) -> B:
        """The backend that runs `case` (the arguments of the backends' `supports`).

        Raises:
            ValueError: a forced name is unknown or unavailable, or no backend supports the case.
        """
        backends = self.backends()
        name = backend or getattr(self._forced, "name", None) or os.environ.get(self.env_var) or None
        if name is not None:
            if name not in backends:
                raise ValueError(f"unknown {self.kind} backend {name!r}; registered: {list(backends)}")
            if not backends[name].available():
                raise ValueError(f"{self.kind} backend {name!r} is not available in this process")
            return backends[name]
        for be in backends.values():
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
            except Exception as err:  # noqa: BLE001 - a broken optional backend must not break the op
                warnings.warn(f"{self.kind} backend module {mod} failed to import: {err!r}")
