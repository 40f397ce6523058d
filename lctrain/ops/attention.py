"""Local softmax attention with log-sum-exp: one dispatch over registered backends.

Every sequence-parallel method computes its local blocks through :func:`attention_forward` (returning the
output and the log-sum-exp that partial results are merged with) and :func:`attention_backward` (which
accepts an externally merged output and lse). Backends register with a `supports(q, k, v, causal)`
predicate and a priority; per call the highest-priority available backend that supports the case runs.
One backend can be forced by `backend=`, by the :func:`use_attention_backend` context manager, or by the
environment variable LCTRAIN_ATTN_BACKEND (in that order of precedence); a forced backend is used without
asking `supports` (the rules are lctrain.ops.registry's, shared with linear attention).

Built in: "flash_attn" (priority 20, if importable), "sdpa" (10), "reference" (0, always). The Triton
kernel registers itself as "triton" (priority 30) from `lctrain.kernels.flash_attention`, loaded on first
dispatch; until `make gpu-check` records a passing run of it on a GPU, flash-attn (when installed) and SDPA rank
above it there (`validated_on_gpu` is that record's verdict, see lctrain.ops.registry).

Conventions (all backends): q `[b, sq, h, d]`, k and v `[b, sk, h_kv, d]` with `h % h_kv == 0`; o like q;
lse `[b, h, sq]` natural log, float32 (float64 when the inputs are float64, so float64 runs stay exact);
causal masks aligned bottom-right when sq != sk; rows with no visible key give o = 0, lse = -inf.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from lctrain.ops import attention_flash_attn, attention_ref, attention_sdpa
from lctrain.ops.registry import BackendRegistry

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
SupportsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], bool]

ENV_VAR = "LCTRAIN_ATTN_BACKEND"


@dataclass(frozen=True)
class AttentionBackend:
    """One local attention implementation."""

    name: str
    """Name used to force it (`backend=`, `use_attention_backend`, LCTRAIN_ATTN_BACKEND)."""
    forward: ForwardFn
    """(q, k, v, causal, softmax_scale) -> (o, lse)."""
    backward: BackwardFn
    """(do, q, k, v, o, lse, causal, softmax_scale) -> (dq, dk, dv)."""
    supports: SupportsFn
    """(q, k, v, causal) -> whether automatic dispatch may pick it for the case (device, dtype, shapes)."""
    priority: int
    """Higher wins when several support a case."""
    available: Callable[[], bool]
    """Whether the backend can run at all in this process (its library imports, its device exists)."""
    validated_on_gpu: bool = False
    """At registration: the claim that it wraps a kernel its authors validate on GPUs, or plain PyTorch (it
    orders the backends no GPU has run yet). As returned by the registry: whether `make gpu-check` ran it on a
    GPU and it passed (lctrain.ops.registry)."""


#: The registered backends; the Triton kernel's package registers itself when loaded on first dispatch.
REGISTRY: BackendRegistry[AttentionBackend] = BackendRegistry(
    "attention", ENV_VAR, plugins=("lctrain.kernels.flash_attention",))


def register_attention_backend(name: str, forward: ForwardFn, backward: BackwardFn, supports: SupportsFn,
                               priority: int, available: Callable[[], bool] | None = None,
                               validated_on_gpu: bool = False) -> None:
    """Register (or replace) a backend under `name`; see :class:`AttentionBackend` for the fields."""
    REGISTRY.register(AttentionBackend(name, forward, backward, supports, priority, available or (lambda: True),
                                       validated_on_gpu))


def attention_backends() -> dict[str, AttentionBackend]:
    """The registered backends by name, highest priority first."""
    return REGISTRY.backends()


def use_attention_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force backend `name` for the attention calls of this thread inside the block (None: automatic)."""
    return REGISTRY.use(name)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [b, s, h, d] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention dtypes disagree: q {q.dtype}, k {k.dtype}, v {v.dtype}")


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   backend: str | None = None) -> AttentionBackend:
    """The backend a call with these inputs runs on (forced, or the best that supports the case)."""
    return REGISTRY.select(q, k, v, causal, backend=backend,
                           describe=lambda: f"q {tuple(q.shape)} {q.dtype} on {q.device}, k {tuple(k.shape)}, "
                                            f"causal={causal}")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp (not differentiable; see :func:`attention` for autograd).

    Args:
        q: `[b, sq, h, d]`.
        k, v: `[b, sk, h_kv, d]`, `h % h_kv == 0`.
        causal: bottom-right aligned causal mask when True.
        softmax_scale: multiplies q k^T.
        backend: force a backend by name (default: automatic).
    Returns:
        o `[b, sq, h, d]` (q's dtype), lse `[b, h, sq]` (float32; float64 for float64 inputs).
    """
    _check(q, k, v)
    return select_backend(q, k, v, causal, backend).forward(q, k, v, causal, softmax_scale)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, softmax_scale: float,
                       backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention given the output and lse (which may be merged over several key blocks).

    Args:
        do: gradient of the output, `[b, sq, h, d]`.
        q, k, v: as in :func:`attention_forward`.
        o, lse: the output and log-sum-exp the gradient refers to (for a block of a larger attention:
            the final merged ones).
        causal, softmax_scale, backend: as in :func:`attention_forward`.
    Returns:
        dq `[b, sq, h, d]`, dk and dv `[b, sk, h_kv, d]`.
    """
    _check(q, k, v)
    return select_backend(q, k, v, causal, backend).backward(do, q, k, v, o, lse, causal, softmax_scale)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        o, lse = attention_forward(q, k, v, causal, scale, backend)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Differentiable local attention through the dispatch (no sequence parallelism).

    Args:
        q: `[b, sq, h, d]`; k, v: `[b, sk, h_kv, d]`.
        causal: bottom-right aligned causal mask.
        softmax_scale: default 1/sqrt(d).
        backend: force a backend by name.
    Returns:
        o `[b, sq, h, d]`.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _Attention.apply(q, k, v, causal, scale, backend)


# Claimed: PyTorch's kernels and flash-attn are validated on GPUs by their authors (these adapters are not, until
# make gpu-check records them); the Triton kernel registers itself without a claim.
register_attention_backend("reference", attention_ref.reference_attention_forward,
                           attention_ref.reference_attention_backward, lambda q, k, v, causal: True, priority=0,
                           validated_on_gpu=True)
register_attention_backend("sdpa", attention_sdpa.sdpa_attention_forward, attention_sdpa.sdpa_attention_backward,
                           attention_sdpa.supports, priority=10, validated_on_gpu=True)
register_attention_backend("flash_attn", attention_flash_attn.flash_attn_forward,
                           attention_flash_attn.flash_attn_backward, attention_flash_attn.supports, priority=20,
                           available=attention_flash_attn.available, validated_on_gpu=True)
