"""The memory model of fla's chunk kernels for the plain-PyTorch chunk backends: keep the inputs, recompute the rest.

An autograd graph of a chunked linear-attention form keeps every intra-chunk product for backward (the
`[c, c]` score blocks, float32 copies of q, k, v, the decayed keys, the states entering every chunk): 5-10x
the bytes of q, k, v in bf16. `lean_apply(fn, tensors)` runs `fn` without a graph and saves only its tensor
inputs (q, k, v, gates, beta, the entering state: references, not copies); backward rebuilds the graph of
that one call and differentiates it, so at most one layer's intra-chunk terms exist at a time (during its
backward). The arithmetic is the same code in both passes: outputs and gradients are bit for bit those of
the plain graph.

A caller that differentiates at once (a recompute inside another Function's backward, e.g. LASP-1/LASP-2)
wraps its call in `differentiate_now()`: the graph is built directly, which saves recomputing the forward twice.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch

_STATE = threading.local()


@contextlib.contextmanager
def differentiate_now() -> Iterator[None]:
    """Inside the block, lean ops build their ordinary autograd graph (the caller differentiates it right away)."""
    old = getattr(_STATE, "direct", False)
    _STATE.direct = True
    try:
        yield
    finally:
        _STATE.direct = old


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn = fn
        o, final = fn(*tensors)
        ctx.has_final = final is not None
        ctx.save_for_backward(*tensors)
        return (o, final) if final is not None else o

    @staticmethod
    def backward(ctx, do, d_final=None):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, need)]
            o, final = ctx.fn(*leaves)
            wrt = [x for x, n in zip(leaves, need) if n]
            outs, grads = ([o, final], [do, d_final]) if ctx.has_final else ([o], [do])
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        return (None, *(next(got) if n else None for n in need))


def lean_apply(fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
               tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`fn(*tensors) -> (o, final_state or None)`, keeping only `tensors` for backward (see module docstring).

    Without grad, with no input requiring grad, or inside `differentiate_now()`, `fn` just runs.
    """
    direct = getattr(_STATE, "direct", False)
    if direct or not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return fn(*tensors)
    out = _Recompute.apply(fn, *tensors)
    return out if isinstance(out, tuple) else (out, None)


__all__ = ["differentiate_now", "lean_apply"]
