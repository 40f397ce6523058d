"""Assertions with stated tolerances, used by every reference-equivalence test."""
from __future__ import annotations

import torch

#: Tolerances per dtype: (rtol, atol). float64 is the exactness check; float32 allows accumulation order.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
              torch.float16: (2e-3, 2e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rtol: float | None = None,
                 atol: float | None = None) -> None:
    """`torch.testing.assert_close` with lctrain's per-dtype tolerances, scaled to the tensor's magnitude.

    The absolute tolerance is multiplied by max(1, max|expected|), so a check means the same for
    tensors of different scales (gradients of long sequences grow with the sequence).
    """
    d_rtol, d_atol = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}" if name else m)
