"""Checks on tensor *values*, which read device memory on the host (a device synchronisation each).

They are off in the hot path: shape and dtype checks are free (host metadata), but `bool((x > 0).any())` waits
for the device. Turn value checks on for a debugging run with env LCTRAIN_DEBUG_CHECKS=1, or for a block of
code with `with debug_checks():`. Parameters whose values must satisfy a constraint (a decay log(lambda) <= 0)
are checked once where they are created (see :func:`check_log_decay`), not on every call.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

ENV_VAR = "LCTRAIN_DEBUG_CHECKS"

_state = threading.local()


def debug_checks_enabled() -> bool:
    """Whether per-call value checks run: a `debug_checks` block of this thread, else env LCTRAIN_DEBUG_CHECKS."""
    forced = getattr(_state, "enabled", None)
    if forced is not None:
        return forced
    return os.environ.get(ENV_VAR, "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Turn per-call value checks on (or off) for this thread inside the block."""
    old = getattr(_state, "enabled", None)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = old


def log_decay_problem(log_decay: torch.Tensor) -> str | None:
    """The error message when some log(lambda) > 0 (a growing "decay"), else None. Synchronises the device."""
    if bool((log_decay > 0).any()):
        return f"log_decay must be <= 0 (a decay lambda <= 1), got max {log_decay.max().item():.4g}"
    return None


def check_log_decay(log_decay: torch.Tensor) -> None:
    """Raise ValueError when some log(lambda) > 0. One device sync: call it once per parameter, not per step."""
    problem = log_decay_problem(log_decay)
    if problem:
        raise ValueError(problem)
