"""The rehearsal's watchers: memory by source line, CPU tensors in device ops, fp32 matmuls under bf16.

Host syncs and syncing ops are lctrain.testing.hot_path's one detector (`watch_syncing_ops`), collectives its
`watch_collectives`; this module adds what only a rehearsal needs. Every watcher is a TorchDispatchMode (it sees
each aten op after autograd, forward and backward alike) and labels what it sees with the current `Phase`.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lctrain.ops.precision import fp32_reason
from lctrain.testing.hot_path import source_line

#: Device types that stand for GPU memory (meta in a rehearsal, cuda on a GPU).
DEVICE_TYPES = ("meta", "cuda")
#: Memory categories: parameters, gradients, optimizer states (these three are the "states"), collective buffers
#: (storages created inside lctrain.parallel.comm) and everything else (activations and temporaries).
CATEGORIES = ("param", "grad", "optimizer", "comm", "activation")


@dataclass
class Phase:
    """Where the rehearsal is: "setup", "step" (with its 1-based index), "log", "eval", "save"."""

    name: str = "setup"
    step: int = 0

    def label(self) -> str:
        return f"{self.name} {self.step}" if self.name == "step" else self.name


@dataclass(frozen=True)
class Finding:
    """One thing a watcher saw: its class (host_sync | cpu_tensor_in_device_op | fp32_matmul | cpu_collective),
    the op, the source line, a detail and the phase."""

    kind: str
    op: str
    line: str
    detail: str
    phase: str


def _in_comm() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith("lctrain/parallel/comm.py"):
            return True
        f = f.f_back
    return False


class MemoryWatcher(TorchDispatchMode):
    """Every device storage created by an op inside the block, until its last tensor dies: live bytes by category,
    the peak (and what was live then), and the allocations by source line.

    A storage's category is "comm" when created inside lctrain.parallel.comm, else "activation", until `adopt`
    reclassifies it (parameters, gradients, optimizer states). Sizes are the storages' real sizes, so meta tensors
    measure exactly what the GPU's caching allocator is asked for (before its rounding and fragmentation).
    """

    def __init__(self, device_types: tuple[str, ...] = DEVICE_TYPES) -> None:
        super().__init__()
        self.device_types = device_types  # the planner's real gloo run watches "cpu" too
        self.live: dict[int, list] = {}  # storage id -> [nbytes, category, line]
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.at_peak: dict[str, int] = dict(self.current)
        self.category_peak = dict(self.current)
        self.by_line: dict[tuple[str, int, str], int] = {}  # (line, nbytes, category) -> count
        self._paused = 0

    @property
    def total(self) -> int:
        return sum(self.current.values())

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]

    def _bump(self, category: str) -> None:
        self.category_peak[category] = max(self.category_peak[category], self.current[category])
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.current)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Track nothing inside the block (the model build: a run builds on the host and moves the result)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def track(self, t: torch.Tensor, category: str | None = None, line: str | None = None) -> None:
        """Count `t`'s storage (once) from now on, in `category` (default: by where it was created)."""
        if t.device.type not in self.device_types or self._paused:
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            if category is not None:
                self.adopt(t, category)
            return
        nbytes = st.nbytes()
        category = category or ("comm" if _in_comm() else "activation")
        line = line or source_line()
        self.live[key] = [nbytes, category, line]
        self.current[category] += nbytes
        self._count(line, nbytes, category, 1)
        weakref.finalize(st, self._release, key)
        self._bump(category)

    def adopt(self, t: torch.Tensor, category: str) -> None:
        """Count `t`'s storage as `category` (tracking it if it is not yet)."""
        if t.device.type not in self.device_types:
            return
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None:
            self.track(t, category)
            return
        if entry[1] != category:
            self.current[entry[1]] -= entry[0]
            self._count(entry[2], entry[0], entry[1], -1)
            self._count(entry[2], entry[0], category, 1)
            entry[1] = category
            self.current[category] += entry[0]
            self._bump(category)

    def _count(self, line: str, nbytes: int, category: str, n: int) -> None:
        k = (line, nbytes, category)
        self.by_line[k] = self.by_line.get(k, 0) + n
        if not self.by_line[k]:
            del self.by_line[k]

    def live_bytes(self, category: str) -> int:
        return self.current[category]

    def largest(self, n: int = 10) -> list[dict[str, Any]]:
        """The `n` largest single allocations: bytes, source line, category, and how often that line made one."""
        rows = sorted(self.by_line.items(), key=lambda kv: (-kv[0][1], kv[0][0]))[:n]
        return [{"bytes": nbytes, "line": line, "category": cat, "count": count}
                for (line, nbytes, cat), count in rows]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for x in flat:
            if isinstance(x, torch.Tensor):
                self.track(x)
        return out


#: aten matmul and attention ops: under bf16 their floating inputs must be bf16 (tensor cores), not fp32.
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward",
              "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward")
#: Copies: a CPU source is an explicit host-to-device transfer, not a hidden one.
_COPY_OPS = ("_to_copy", "copy_", "_copy_from", "lift_fresh", "lift_fresh_copy", "_local_scalar_dense")


class DeviceDtypeWatcher(TorchDispatchMode):
    """Device ops fed a CPU tensor (not a 0-dim scalar: CUDA would copy it host-to-device behind the code's back, or
    refuse), and matmul / attention ops with fp32 inputs when the run computes in `dtype` (bf16). Also counts the
    explicit host-to-device copies (bytes and lines), which are allowed.

    Every fp32 matmul under bf16 is a finding unless the code that issued it marked it with
    `lctrain.ops.precision.fp32_by_design(reason)` (state-only math, e.g. the LASP-2 prefix fold of `[h, dk, dv]`
    states; DESIGN.md keeps states and their prefix chain in float32): those are counted in `by_design`
    (reason -> [calls, FLOPs]) and reported, not failed; so are the backward matmuls the autograd engine runs on a
    float32 storage such a block made or viewed (the flag is not set there). Nothing is excused by shape: a [c, c]
    chunk product cannot be told from a [d_k, d_v] state when the chunk is as long as the head dim (64 and 64 in the
    Llama-1B configs).
    """

    def __init__(self, phase: Phase, dtype: torch.dtype) -> None:
        super().__init__()
        self.phase, self.dtype = phase, dtype
        self.findings: list[Finding] = []
        self.h2d: dict[str, int] = {}  # source line -> bytes copied host-to-device (explicit)
        self.by_design: dict[str, list[int]] = {}  # fp32_by_design reason -> [matmul calls, FLOPs]
        self._tagged: dict[int, str] = {}  # storage id -> reason, for float32 storages made inside fp32_by_design

    def by_design_notes(self) -> list[str]:
        """One line per `fp32_by_design` reason: calls and FLOPs of its float32 matmuls (not findings)."""
        return [f"fp32 by design: {reason}: {calls} matmul(s), {flops:.3g} FLOPs"
                for reason, (calls, flops) in sorted(self.by_design.items())]

    def _tag(self, out: Any, reason: str) -> None:
        """Remember the float32 storages an `fp32_by_design` block made or took a view of (the backward matmuls the
        autograd engine runs on them are by design too; sequence operands are never float32 there under bf16)."""
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.device.type in DEVICE_TYPES and x.dtype == torch.float32:
                st = x.untyped_storage()
                if id(st) not in self._tagged:
                    self._tagged[id(st)] = reason
                    weakref.finalize(st, self._tagged.pop, id(st), None)

    def _backward_reason(self, inputs: list[torch.Tensor]) -> str | None:
        """Inside the autograd engine, the reason of an `fp32_by_design` block that produced one of `inputs`."""
        if not self._tagged or torch._C._current_graph_task_id() == -1:
            return None
        for t in inputs:
            reason = self._tagged.get(id(t.untyped_storage()))
            if reason is not None:
                return f"{reason} (backward)"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        design = fp32_reason()
        flat, _ = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type in DEVICE_TYPES]
        if name in _COPY_OPS:
            if name in ("_to_copy", "copy_") and tensors:
                src = tensors[1] if name == "copy_" and len(tensors) > 1 else tensors[0]
                dst = kwargs.get("device") if name == "_to_copy" else tensors[0].device
                if src.device.type == "cpu" and dst is not None and torch.device(dst).type in DEVICE_TYPES:
                    line = source_line()
                    self.h2d[line] = self.h2d.get(line, 0) + src.numel() * src.element_size()
        elif on_device:
            host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host:
                self.findings.append(Finding(
                    "cpu_tensor_in_device_op", name, source_line(),
                    f"{name} got a CPU tensor {tuple(host[0].shape)} {host[0].dtype} beside device tensors (a hidden "
                    "host-to-device copy; CUDA refuses or copies it every call)", self.phase.label()))
            if self.dtype != torch.float32 and name in MATMUL_OPS:
                out = func(*args, **kwargs)
                # Attention ops: q, k, v (and dO) only; the log-sum-exp is float32 by definition.
                inputs = on_device if name in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul") else [
                    t for t in on_device[:4] if t.dim() == 4]
                reason = design or self._backward_reason(inputs)
                if design is not None:
                    self._tag(out, design)
                if reason is not None and any(t.dtype == torch.float32 for t in inputs):
                    entry = self.by_design.setdefault(reason, [0, 0])
                    entry[0] += 1
                    entry[1] += _matmul_flops(name, args, out)
                elif any(t.dtype == torch.float32 for t in inputs):
                    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs[:3])
                    self.findings.append(Finding("fp32_matmul", name, source_line(),
                                                 f"{name} in float32 under {str(self.dtype).replace('torch.', '')} "
                                                 f"({shapes})", self.phase.label()))
                return out
        out = func(*args, **kwargs)
        if design is not None and name not in _COPY_OPS:
            self._tag(out, design)
        return out


def _matmul_flops(name: str, args: tuple, out: Any) -> int:
    """2 x output elements x contraction length of a (batched) matmul; 0 for attention ops."""
    if name not in ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul") or not isinstance(out, torch.Tensor):
        return 0
    a = args[1] if name in ("addmm", "baddbmm", "addbmm") else args[0]
    if not isinstance(a, torch.Tensor):
        return 0
    inner = a.shape[-1]
    return 2 * out.numel() * inner * (a.shape[0] if name == "addbmm" else 1)
