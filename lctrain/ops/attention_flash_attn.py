"""Softmax attention through the flash-attn 2 library (CUDA, float16/bfloat16), when it is installed.

flash-attn already uses lctrain's conventions: `[b, s, h, d]` tensors, native GQA (dK/dV with kv heads),
bottom-right aligned causal masks, lse `[b, h, sq]` float32. Its private `_flash_attn_forward/_backward`
are used because they return and accept the log-sum-exp; their keyword names changed across releases
(window_size vs window_size_left/right, softcap, ...), so arguments are passed by the names the installed
version declares. Both calls are torch custom ops (`lctrain::flash_attn_fwd` / `lctrain::flash_attn_bwd`, with
fake kernels and the backward as the forward's autograd formula), whatever flash-attn version is installed, so
meta and fake tensors (the rehearsal) and torch.compile pass through them without importing flash-attn.

Absence of the library is never an error: the backend just reports unavailable. A library that is installed
but fails to import (a wheel built for another torch or CUDA) is: on a machine with a GPU it raises, naming
the cause, unless env LCTRAIN_ALLOW_KERNEL_FALLBACK=1 allows falling back (then, and on CPU, it warns and the
backend is unavailable) -- a silent fallback would turn a broken image into a slow run.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

import torch

from lctrain.ops.registry import is_gpu_tensor


@functools.lru_cache(maxsize=1)
def _interface():
    if importlib.util.find_spec("flash_attn") is None:
        return None  # not installed
    try:
        from flash_attn import flash_attn_interface
    except Exception as err:  # noqa: BLE001 - a broken install: loud on a GPU machine, see the module docstring
        msg = f"flash-attn is installed but fails to import: {err!r}"
        if torch.cuda.is_available() and os.environ.get("LCTRAIN_ALLOW_KERNEL_FALLBACK", "0") in ("", "0"):
            raise RuntimeError(f"{msg}. Reinstall it for this torch/CUDA, uninstall it, or set "
                               f"LCTRAIN_ALLOW_KERNEL_FALLBACK=1 to fall back to SDPA with a warning.") from err
        warnings.warn(msg + " (the flash_attn backend is unavailable)")
        return None
    return flash_attn_interface


def available() -> bool:
    """flash-attn imports and a CUDA device exists."""
    return torch.cuda.is_available() and _interface() is not None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """CUDA, float16/bfloat16, head dim a multiple of 8 up to 256."""
    d = q.shape[-1]
    return (is_gpu_tensor(q) and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and q.shape[1] > 0 and k.shape[1] > 0)


def _call(fn, values: dict):
    # flash-attn >= 2.6 wraps these in torch.library custom ops; the plain function keeps the signature.
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    kwargs = {name: val for name, val in values.items() if name in params}
    return fn(**kwargs)


def _common(causal: bool, scale: float) -> dict:
    return dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=(-1, -1), window_size_left=-1,
                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, return_softmax=False,
                rng_state=None)


@torch.library.custom_op("lctrain::flash_attn_fwd", mutates_args=())
def flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn's forward as a torch custom op: o `[b, sq, h, d]` and lse `[b, h, sq]` float32."""
    fa = _interface()
    res = _call(fa._flash_attn_forward, dict(q=q, k=k, v=v, **_common(causal, softmax_scale)))
    # flash-attn <= 2.5 returns (out, q, k, v, out_padded, lse, S, rng); later (out, lse, S, rng).
    o, lse = (res[0], res[5]) if len(res) == 8 else (res[0], res[1])
    return o, lse[..., : q.shape[1]].contiguous()


@flash_attn_fwd_op.register_fake
def _forward_fake(q, k, v, causal, softmax_scale):
    batch, sq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, sq), dtype=torch.float32)


@torch.library.custom_op("lctrain::flash_attn_bwd", mutates_args=())
def flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, causal: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn's backward as a torch custom op: dq, dk, dv (kv heads) for the given (possibly merged) o, lse."""
    fa = _interface()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call(fa._flash_attn_backward, dict(dout=do.contiguous(), q=q, k=k, v=v, out=o.contiguous(),
                                        softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv,
                                        **_common(causal, softmax_scale)))
    return dq, dk, dv


@flash_attn_bwd_op.register_fake
def _backward_fake(do, q, k, v, o, lse, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx, do, d_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None  # the lse output is not differentiated (flash-attn's backward takes none)


flash_attn_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `[b, sq, h, d]` and lse `[b, h, sq]` float32."""
    return flash_attn_fwd_op(q, k, v, causal, float(softmax_scale))


def flash_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, causal: bool,
                        softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for the given (possibly merged) o and lse."""
    return flash_attn_bwd_op(do, q, k, v, o, lse, causal, float(softmax_scale))
