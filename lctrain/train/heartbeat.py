"""This process's liveness, for a supervisor that asks (lctrain.launch's rank actors): beats, not log lines.

The trainer beats once per step (`beat`). Work that legitimately takes long without steps (saving a
checkpoint, evaluating, loading) runs inside `phase(name)`, during which a background thread keeps beating
and the phase's start time is reported, so a supervisor can tell "in a long save" from "stuck in a collective":

    snapshot() -> {"age_s": seconds since the last beat, "step": last step, "phase": None | "save" | ...,
                   "phase_age_s": seconds spent in the phase}

A supervisor treats a rank as hung when it is outside a phase and `age_s` exceeds its progress timeout, or
inside one longer than its (larger) phase timeout.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: seconds between the background beats inside a phase
INTERVAL_S = 1.0

_lock = threading.Lock()
_state = {"t": time.monotonic(), "step": 0, "phase": None, "phase_t": None}


def beat(step: int | None = None, phase: str | None = None) -> None:
    """Record liveness now (at `step`; `phase` None means ordinary training)."""
    with _lock:
        _state["t"] = time.monotonic()
        if step is not None:
            _state["step"] = step
        if phase != _state["phase"]:
            _state["phase"], _state["phase_t"] = phase, (time.monotonic() if phase else None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a long phase (save, eval, load): beats continue from a thread until it ends."""
    with _lock:
        outer = (_state["phase"], _state["phase_t"])
        _state["phase"], _state["phase_t"], _state["t"] = name, time.monotonic(), time.monotonic()
    stop = threading.Event()

    def keep_beating() -> None:
        while not stop.wait(INTERVAL_S):
            with _lock:
                _state["t"] = time.monotonic()

    t = threading.Thread(target=keep_beating, name=f"heartbeat-{name}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        with _lock:
            _state["phase"], _state["phase_t"] = outer
            _state["t"] = time.monotonic()


def snapshot() -> dict:
    """The liveness record a supervisor reads (see the module docstring)."""
    now = time.monotonic()
    with _lock:
        return {"age_s": now - _state["t"], "step": _state["step"], "phase": _state["phase"],
                "phase_age_s": now - _state["phase_t"] if _state["phase_t"] is not None else 0.0}
