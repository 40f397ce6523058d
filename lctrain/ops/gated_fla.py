"""flash-linear-attention (`fla`) kernels as GPU backends of the gated ops (gla.py, gated_delta.py).

fla's chunk kernels take lctrain's layout (`[b, s, h, d]`, gates `[b, s, h]` / `[b, s, h, dk]`, beta
`[b, s, h]`), an initial state `[b, h, dk, dv]` and return the final state, which is all LASP-2 needs:

    [b, s, h] gate or [h] (expanded)  -> fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=...)
    [b, s, h, dk] gate                -> fla.ops.gla.chunk_gla(q, k, v, g=...)
    gated delta rule                  -> fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta)

fla is never imported when this module is: importing it touches Triton's active driver, which fails on a
machine without a GPU (see DESIGN.md). `fla_available()` asks only whether CUDA is up and the package is
installed (`importlib.util.find_spec`, no import); the adapters import fla inside the call, and `supports`
accepts GPU tensors only (`lctrain.ops.registry.is_gpu_tensor`), so automatic dispatch never reaches them on CPU.
They have not run on a GPU until `make gpu-check` records it (`validated_on_gpu` is the GPU record's verdict);
until then they rank among the backends whose authors validate their kernels (lctrain.ops.registry).
"""
from __future__ import annotations

import importlib.util

import torch

from lctrain.ops.registry import is_gpu_tensor

#: Head dimensions fla's chunk kernels take (their tiles hold a whole key row).
FLA_MAX_HEAD_DIM = 256
#: dtypes the adapters hand to fla (its gated-delta-rule kernels refuse float32 inputs).
FLA_GLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLA_DELTA_DTYPES = (torch.float16, torch.bfloat16)


def fla_available() -> bool:
    """CUDA is available and the `fla` package is installed (checked without importing it)."""
    if not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("fla") is not None
    except (ImportError, ValueError):
        return False


def _on_cuda(*xs: torch.Tensor | None) -> bool:
    return all(x is None or is_gpu_tensor(x) for x in xs)


def fla_supports_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                     beta: torch.Tensor | None = None) -> bool:
    """Automatic dispatch may use fla for gated linear attention on these inputs."""
    return (_on_cuda(q, k, v, g) and q.dtype in FLA_GLA_DTYPES and q.shape[-1] <= FLA_MAX_HEAD_DIM
            and v.shape[-1] <= FLA_MAX_HEAD_DIM)


def fla_supports_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                       beta: torch.Tensor | None = None) -> bool:
    """Automatic dispatch may use fla for the gated delta rule on these inputs."""
    return (_on_cuda(q, k, v, g, beta) and q.dtype in FLA_DELTA_DTYPES and q.shape[-1] <= FLA_MAX_HEAD_DIM
            and v.shape[-1] <= FLA_MAX_HEAD_DIM)


def _state(initial_state: torch.Tensor | None) -> torch.Tensor | None:
    return None if initial_state is None else initial_state.float().contiguous()


def _final(final: torch.Tensor | None, output_final_state: bool) -> torch.Tensor | None:
    return final.float() if output_final_state and final is not None else None


def fla_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None, scale: float = 1.0,
            initial_state: torch.Tensor | None = None,
            output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention (lctrain's signature, gla.py) on fla's chunk kernels."""
    b, s, h, dk = q.shape
    q, k, v = (x.contiguous() for x in (q, k, v))
    if g is not None and g.dim() == 4:
        from fla.ops.gla import chunk_gla

        o, final = chunk_gla(q, k, v, g=g.float().contiguous(), scale=scale, initial_state=_state(initial_state),
                             output_final_state=output_final_state)
    else:
        from fla.ops.simple_gla import chunk_simple_gla

        # A [h] decay is expanded to [b, s, h] (fla's own constant-decay path has no gradient for it).
        gs = None if g is None else g.float().expand(b, s, h).contiguous()
        o, final = chunk_simple_gla(q, k, v, g=gs, scale=scale, initial_state=_state(initial_state),
                                    output_final_state=output_final_state)
    return o.to(v.dtype), _final(final, output_final_state)


def fla_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                         beta: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (lctrain's signature, gated_delta.py) on fla's chunk kernels."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    b, s, h, dk = q.shape
    gs = (torch.zeros(b, s, h, dtype=torch.float32, device=q.device) if g is None
          else g.float().expand(b, s, h).contiguous())
    q, k, v = (x.contiguous() for x in (q, k, v))
    o, final = chunk_gated_delta_rule(q, k, v, g=gs, beta=beta.to(q.dtype).contiguous(), scale=scale,
                                      initial_state=_state(initial_state), output_final_state=output_final_state)
    return o.to(v.dtype), _final(final, output_final_state)
