"""Preemption notice: one process-wide flag, set by a signal or by the launcher, read by the training loop.

Who tells a rank that its job is about to be killed, per launcher:

- `lctrain train --nproc N`, torchrun, SLURM without Ray, Kubernetes: SIGTERM (or SIGUSR1, what
  `sbatch --signal=B:USR1@<grace>` sends) to the rank process. :func:`install` puts the handler in place; it must
  run in the process's main thread (Python only lets that thread set handlers, and only that thread runs them).
- Ray: the rank runs inside an actor method thread, so the trainer cannot install anything; the actor's
  `__init__` runs in the worker process's main thread and installs the handler there (launch/worker.py), so a
  SIGTERM to the worker process sets the same flag. The supervisor, told by its own signal (SLURM/Kubernetes stop
  the driver), calls each actor's `preempt` method, which calls :func:`request`.

The handler only sets a flag (a threading.Event: safe whichever thread reads it); the ranks agree on it at the
next step end with the trainer's one per-step 4-byte all-reduce, save one checkpoint, and the process exits with
:data:`REQUEUE_EXIT`, the code every recipe requeues on. A watchdog (started by the first notice) bounds the time
from notice to exit by the grace period.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

#: Exit code of a run that stopped on a preemption notice after saving its checkpoint: EX_TEMPFAIL ("try again").
#: SLURM (`scontrol requeue` in launch/slurm/lctrain.sbatch), Kubernetes (podFailurePolicy) and torchrun
#: (`--max-restarts`) restart on it; `lctrain launch` returns it when its own job was preempted.
REQUEUE_EXIT = 75
#: Signals taken as a preemption notice (SIGTERM: Kubernetes, torchrun, SLURM's default; SIGUSR1: sbatch --signal).
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: torchrun (torch.distributed.elastic) kills its workers this many seconds after passing its own SIGTERM on.
TORCHRUN_KILL_S = 30.0
#: Seconds the scheduler must wait beyond train.preempt_grace_s (process and Ray teardown after the save).
TEARDOWN_MARGIN_S = 15.0

_notice = threading.Event()
_armed = [0]
_reason: list[str] = []
_previous: dict[int, object] = {}
_listeners: list[Callable[[str], None]] = []


def request(reason: str = "preemption requested") -> None:
    """Set the flag (from a signal handler, a Ray actor method, a test); listeners run on the first notice."""
    if _notice.is_set():
        return
    _reason.append(reason)
    _notice.set()
    for fn in list(_listeners):
        fn(reason)


def requested() -> bool:
    """Whether this process got a preemption notice."""
    return _notice.is_set()


def reason() -> str | None:
    """What the first notice was (e.g. "SIGTERM"), or None."""
    return _reason[0] if _reason else None


def clear() -> None:
    """Forget the notice (a new run in the same process: a Ray actor reused, a test)."""
    _notice.clear()
    _reason.clear()


def add_listener(fn: Callable[[str], None]) -> Callable[[], None]:
    """Call `fn(reason)` on the first notice (at once if it already came); returns the function that removes it."""
    _listeners.append(fn)
    if _notice.is_set():
        fn(reason() or "")
    return lambda: _listeners.remove(fn) if fn in _listeners else None


def arm() -> None:
    """A loop that acts on notices is running: signals become notices (nested calls count)."""
    _armed[0] += 1


def disarm() -> None:
    """The loop ended: a signal does again what it did before :func:`install` (Ray's handler, or terminate)."""
    _armed[0] = max(0, _armed[0] - 1)


def _handler(signum, frame) -> None:
    if _armed[0]:
        request(signal.Signals(signum).name)
        return
    old = _previous.get(signum, signal.SIG_DFL)
    if callable(old):
        old(signum, frame)
    elif old != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install(signals: tuple[int, ...] = SIGNALS) -> bool:
    """Make `signals` preemption notices in this process while a loop is armed (:func:`arm`); True when installed
    (only the main thread can). Outside an armed loop a signal does what it did before.

    Idempotent. Handlers installed elsewhere before are remembered and put back by :func:`uninstall`.
    """
    if threading.current_thread() is not threading.main_thread():
        return installed()
    for sig in signals:
        if signal.getsignal(sig) is not _handler:
            _previous[sig] = signal.signal(sig, _handler)
    return True


def installed() -> bool:
    """Whether the preemption handler is this process's SIGTERM handler."""
    return signal.getsignal(signal.SIGTERM) is _handler


def uninstall() -> None:
    """Put the handlers :func:`install` replaced back (main thread only; elsewhere nothing happens)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, old in list(_previous.items()):
        if signal.getsignal(sig) is _handler:
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        del _previous[sig]


def under_torchrun() -> bool:
    """Whether this process is a torchrun (torch.distributed.elastic) worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def effective_grace(grace_s: float) -> float:
    """The grace the watchdog can use: `grace_s`, but under torchrun less than its 30 s kill (a save that needs
    longer is killed anyway; better to exit cleanly with the checkpoint before)."""
    return min(grace_s, TORCHRUN_KILL_S - 2.0) if under_torchrun() else grace_s


def check_preemption(cfg, target=None) -> list[str]:
    """Preflight: the scheduler's kill delay (launch.termination_grace_s, e.g. Kubernetes
    terminationGracePeriodSeconds) must cover train.preempt_grace_s plus teardown, or the save is killed."""
    grace = float(getattr(cfg.train, "preempt_grace_s", 0.0))
    kill = float(getattr(getattr(cfg, "launch", None), "termination_grace_s", 0.0) or 0.0)
    if grace <= 0 or kill <= 0:
        return []
    if kill < grace + TEARDOWN_MARGIN_S:
        return [f"launch.termination_grace_s = {kill:g} s (the scheduler's kill delay, e.g. Kubernetes "
                f"terminationGracePeriodSeconds) is shorter than train.preempt_grace_s = {grace:g} s (step end + "
                f"checkpoint) + {TEARDOWN_MARGIN_S:g} s teardown: a preempted job would be killed mid-save; raise "
                f"the pod's terminationGracePeriodSeconds (and launch.termination_grace_s) to at least "
                f"{grace + TEARDOWN_MARGIN_S:g}"]
    return []
