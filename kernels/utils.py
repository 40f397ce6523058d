"""Shared plumbing for lctrain's Triton kernels: where a kernel runs (interpreter or GPU) and its block sizes.

A kernel here is written as a plain Python function and wrapped by `triton_kernel`, which builds the
Triton object only at launch time, from the environment of that moment:

- `TRITON_INTERPRET=1` (CPU tests): Triton's interpreter runs the kernel with the fixed block sizes given
  in `interpret=`. Nothing touches Triton's active driver, and no autotuning happens (`@triton.autotune`
  fails on a machine without a GPU driver).
- otherwise (GPU): a compiled `JITFunction`, wrapped in `triton.autotune` over the Hopper-oriented configs.

Deciding at launch rather than at import (as `@triton.jit` does) means the result does not depend on
whether this module was imported before or after `TRITON_INTERPRET` was set. For the same reason the
kernels use only Triton builtins: `tl.zeros`, `tl.sum`, `tl.max` and `tl.cdiv` are themselves `@jit`
functions, fixed as compiled or interpreted when `triton` is first imported (in a test process, usually
by Megatron-core, without the variable), so the kernels write `tl.full`, `tl.reduce` with Triton's
standard combine functions, and integer arithmetic instead. Device functions shared by several kernels
are decorated with `triton_helper`, which makes them callable from both worlds.

Offsets are 64-bit where they can pass 2^31 elements (b * s * h * d does at 256K local tokens, 64 heads x
128): every kernel forms a scalar int64 base pointer per (batch, head) and per block of rows with
`row_block_ptrs`, and keeps only the in-block offsets (block rows x row stride) in int32; the host
checks `check_row_stride` so those stay below 2^31.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


def interpreting() -> bool:
    """True when `TRITON_INTERPRET` asks for Triton's interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available_for(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: on CUDA, or on CPU under the interpreter."""
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def check_runnable(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the tensors can be handed to neither the GPU kernels nor the interpreter."""
    if not triton_available_for(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"lctrain's Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                           f"set in the environment (Triton's interpreter); got tensors on {devices}")


_poison = False


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Inside the block, kernel outputs start as NaN (floats) so a test sees any element a kernel failed to write."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output (NaN-filled under `poison_outputs`)."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.fill_(float("nan")) if _poison and dtype.is_floating_point else out


#: Input dtypes the kernels take (they accumulate in float32).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless the tensors have one of `SUPPORTED_DTYPES`."""
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"lctrain's Triton kernels take float16, bfloat16 or float32 inputs; got {t.dtype}")


def pow2(n: int, minimum: int = 16) -> int:
    """The block size covering n: the next power of two, at least `minimum` (tl.dot needs >= 16)."""
    return max(minimum, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact IEEE products for float32/float64 inputs, tensor-core default otherwise."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


#: Largest row stride (elements) for which the int32 in-block offsets (row < 256) x stride stay below 2^31.
MAX_ROW_STRIDE = 2**31 // 256


def check_row_stride(*tensors: torch.Tensor) -> None:
    """Raise ValueError when a row stride (dim 1) is too large for the kernels' int32 in-block offsets."""
    for t in tensors:
        if t.dim() > 1 and t.stride(1) > MAX_ROW_STRIDE:
            raise ValueError(f"row stride {t.stride(1)} exceeds {MAX_ROW_STRIDE} elements (int32 in-block offsets); "
                             f"make the tensor contiguous per token")


class TritonHelper(JITFunction):
    """A `@triton.jit` device function that also runs under the interpreter, whenever `triton` was imported.

    Compiled kernels see a `JITFunction` and inline it as usual; an interpreted kernel calls it as a
    device function through Triton's `InterpretedFunction`, decided at each call (as `TritonKernel` does).
    """

    def __call__(self, *args, **kwargs):
        if interpreting():
            from triton.runtime.interpreter import InterpretedFunction

            interpreted = self.__dict__.get("_interpreted")
            if interpreted is None:
                interpreted = self.__dict__["_interpreted"] = InterpretedFunction(self.fn)
            return interpreted(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def triton_helper(fn: Callable) -> TritonHelper:
    """Decorator for device functions shared by kernels (usable compiled and under the interpreter)."""
    return TritonHelper(fn)


@triton_helper
def head_ptr(ptr, i_b, i_h, stride_b, stride_h):
    """ptr + i_b * stride_b + i_h * stride_h in int64 (the (batch, head) base of a [b, s, h, ...] tensor)."""
    return ptr + tl.cast(i_b, tl.int64) * stride_b + tl.cast(i_h, tl.int64) * stride_h


@triton_helper
def row_block_ptrs(base, row0, offs_r, offs_c, stride_r):
    """Pointers [R, C] to rows row0 + offs_r, columns offs_c: int64 block base, int32 in-block offsets."""
    return base + tl.cast(row0, tl.int64) * stride_r + (offs_r[:, None] * stride_r + offs_c[None, :])


@triton_helper
def load_rows(base, row0, offs_r, offs_c, stride_r, n_rows, n_cols):
    """The [R, C] tile at rows row0 + offs_r (< n_rows) and columns offs_c (< n_cols); 0 outside."""
    mask = ((row0 + offs_r) < n_rows)[:, None] & (offs_c < n_cols)[None, :]
    return tl.load(row_block_ptrs(base, row0, offs_r, offs_c, stride_r), mask=mask, other=0.0)


@triton_helper
def store_rows(base, row0, offs_r, offs_c, stride_r, n_rows, n_cols, value):
    """Store `value` ([R, C]) at rows row0 + offs_r (< n_rows), columns offs_c (< n_cols), in base's dtype."""
    mask = ((row0 + offs_r) < n_rows)[:, None] & (offs_c < n_cols)[None, :]
    tl.store(row_block_ptrs(base, row0, offs_r, offs_c, stride_r), value.to(base.dtype.element_ty), mask=mask)


class TritonKernel:
    """A kernel function compiled for the GPU (autotuned) or run by the interpreter, chosen per launch.

    Launch with `kernel[grid](*args, **kwargs)`; `grid` may be a function of the meta-parameters
    (block sizes), as with Triton's own kernels. Under the interpreter, `interpret` supplies the block
    sizes that autotuning would otherwise pick.
    """

    def __init__(self, fn: Callable, configs: Sequence[triton.Config], key: Sequence[str],
                 interpret: dict[str, Any], restore_value: Sequence[str] = ()):
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.interpret = dict(interpret)
        self.restore_value = list(restore_value)
        self._compiled = None
        self._interpreted = None

    def __getitem__(self, grid):
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            runner = self._interpreted[grid]
            return lambda *args, **kwargs: runner(*args, **{**self.interpret, **kwargs})
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: set TRITON_INTERPRET=1 to run lctrain's Triton kernels on CPU")
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            compiled = JITFunction(self.fn)
            self._compiled = compiled if not self.configs else triton.autotune(
                configs=self.configs, key=self.key, restore_value=self.restore_value or None)(compiled)
        return self._compiled[grid]


def triton_kernel(configs: Sequence[triton.Config] = (), key: Sequence[str] = (),
                  interpret: dict[str, Any] | None = None,
                  restore_value: Sequence[str] = ()) -> Callable[[Callable], TritonKernel]:
    """Decorator turning a Triton kernel function into a `TritonKernel`.

    Args:
        configs: autotuning configs used on the GPU (their `kwargs` are the block-size meta-parameters).
        key: argument names whose change re-triggers autotuning.
        interpret: block sizes used under the interpreter (no autotuning there).
        restore_value: tensor arguments the kernel updates in place; autotuning restores them between
            its trial runs.

    Returns:
        The decorator.
    """
    return lambda fn: TritonKernel(fn, configs, key, interpret or {}, restore_value)
