"""Named compute backends with priorities: the dispatch shared by the softmax and linear attention ops.

Per call, the backend is the one forced -- by the call's `backend=` argument, else a `use(name)` block of
this thread, else the registry's environment variable -- or, when none is forced, the best registered
backend that is available in this process and whose `supports(...)` accepts the inputs. "Best" is the highest
priority, except on a GPU, where backends rank in four groups, priority within each:
  1. validated on a GPU: `make gpu-check` ran the backend there and it passed (the GPU record, below);
  2. not run on a GPU yet, registered with `validated_on_gpu=True`: the registrant's claim that it wraps a kernel
     its authors validate on GPUs (PyTorch's, flash-attn's, fla's) or is plain PyTorch;
  3. not run on a GPU yet, no claim (lctrain's own Triton kernels, checked only under Triton's CPU interpreter);
  4. run on a GPU by gpu-check and failed.
So a kernel only checked under the interpreter cannot outrank flash-attn or PyTorch's fused kernels until a GPU
run validates it, and one that failed there is used only when nothing else supports the case. What callers see
as `validated_on_gpu` (`backends()`, `select()`) is the record's verdict, never the claim: False for every
backend no GPU has run. Env LCTRAIN_ALLOW_UNVALIDATED_GPU=1 lifts the grouping (priority alone decides).

The GPU record is a small JSON file, `{"backends": {"<kind>/<name>": {"passed": bool, "device": ..., "date": ...,
...}}}`, written by `make gpu-check` (`record_gpu_validation`) and read at dispatch (re-read when it changes):
env LCTRAIN_GPU_RECORD, else `gpu_validated.json` beside this module (a GPU session commits the one its
gpu-check wrote). A forced backend is used without asking
`supports` (it must be registered and available): that is how a kernel is run where it is not picked
automatically (Triton under TRITON_INTERPRET=1 on CPU, a GPU benchmark of an unvalidated kernel).

Modules that add backends (the Triton kernels) are imported on first use. A missing module is skipped; one
that fails to import is an error on a machine with a GPU (the kernels are what it came for) unless env
LCTRAIN_ALLOW_KERNEL_FALLBACK=1 allows falling back (then, and on CPU, a warning).

`track()` records which backends calls actually ran on (`lctrain bench sp` prints them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar

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


#: Env var naming the GPU record file (default: `DEFAULT_GPU_RECORD`).
GPU_RECORD_ENV = "LCTRAIN_GPU_RECORD"
DEFAULT_GPU_RECORD = Path(__file__).with_name("gpu_validated.json")
_RECORD_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}


def gpu_record_path() -> Path:
    """The GPU record file dispatch reads (env LCTRAIN_GPU_RECORD, else `DEFAULT_GPU_RECORD`)."""
    return Path(os.environ.get(GPU_RECORD_ENV) or DEFAULT_GPU_RECORD)


def read_gpu_record(path: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """The record's entries by "kind/name" ({} when there is no record); cached until the file changes."""
    path = Path(path) if path is not None else gpu_record_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    cached = _RECORD_CACHE.get(str(path))
    if cached is None or cached[0] != mtime:
        try:
            data = json.loads(path.read_text())
            entries = data.get("backends", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError) as err:
            warnings.warn(f"unreadable GPU record {path}: {err!r}; treating every backend as not run on a GPU")
            entries = {}
        cached = _RECORD_CACHE[str(path)] = (mtime, entries if isinstance(entries, dict) else {})
    return cached[1]


def gpu_verdict(kind: str, name: str) -> bool | None:
    """What gpu-check recorded for backend `name` of registry `kind`: True passed, False failed, None never ran."""
    entry = read_gpu_record().get(f"{kind}/{name}")
    return None if not isinstance(entry, dict) else bool(entry.get("passed"))


def record_gpu_validation(results: dict[str, bool], device: str, path: Path | str | None = None,
                          details: dict[str, dict[str, Any]] | None = None) -> Path:
    """Merge gpu-check's verdicts ("kind/name" -> passed) into the record file (atomically); returns its path."""
    path = Path(path) if path is not None else gpu_record_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = data.get("backends", {}) if isinstance(data, dict) else {}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for key, passed in results.items():
        entries[key] = {"passed": bool(passed), "device": device, "date": date, "torch": torch.__version__,
                        **(details or {}).get(key, {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"backends": dict(sorted(entries.items()))}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


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
        """Registered backends by name, highest priority first (after loading the plugin modules); each with
        `validated_on_gpu` as the GPU record says (never the registrant's claim)."""
        self._load_plugins()
        ranked = sorted(self._backends.items(), key=lambda item: -item[1].priority)
        return {name: self._as_recorded(be) for name, be in ranked}

    def validated_on_gpu(self, name: str) -> bool:
        """Whether `make gpu-check` ran backend `name` on a GPU and it passed."""
        return gpu_verdict(self.kind, name) is True

    def _as_recorded(self, be: B) -> B:
        validated = self.validated_on_gpu(be.name)
        if getattr(be, "validated_on_gpu", validated) == validated or not dataclasses.is_dataclass(be):
            return be
        return dataclasses.replace(be, validated_on_gpu=validated)

    def _gpu_group(self, name: str) -> int:
        """The backend's group on a GPU (module docstring): 0 validated, 1 claimed, 2 unclaimed, 3 failed."""
        verdict = gpu_verdict(self.kind, name)
        if verdict is not None:
            return 0 if verdict else 3
        return 1 if getattr(self._backends[name], "validated_on_gpu", False) else 2

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
            # Stable sort: by group, priority order within each.
            backends.sort(key=lambda be: self._gpu_group(be.name))
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
