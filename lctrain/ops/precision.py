"""Mixed precision of the plain-PyTorch chunk backends, and the one marker for float32 matmuls kept on purpose.

The rule (fla's chunk kernels): every matmul with a sequence-length operand runs in the input dtype (bf16
operands; torch's bf16 GEMM accumulates in float32), gates and decays are computed in float32 (log space,
exponentials) and the decayed operands are rounded to the input dtype right before the matmul; states stay in
float32 (DESIGN.md) and are cast to the input dtype only where they multiply a sequence operand; state updates
are formed from input-dtype operands and accumulated into float32. For float32 and float64 inputs every cast
is a no-op.

State-only math with no sequence dimension (the cross-rank prefix fold of `[h, dk, dv]` states, `[dk, dk]`
maps) stays float32 by design: such code runs inside `fp32_by_design(reason)`, a thread-local flag a dtype
watcher reads (`lctrain.rehearse.watch`) to report those matmuls apart instead of failing them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_STATE = threading.local()


@contextlib.contextmanager
def fp32_by_design(reason: str) -> Iterator[None]:
    """Mark the float32 matmuls inside the block as intended (state-only math); `reason` names what it is."""
    old = getattr(_STATE, "reason", None)
    _STATE.reason = reason
    try:
        yield
    finally:
        _STATE.reason = old


def fp32_reason() -> str | None:
    """The reason of the innermost `fp32_by_design` block around this thread's current code, or None."""
    return getattr(_STATE, "reason", None)


__all__ = ["fp32_by_design", "fp32_reason"]
