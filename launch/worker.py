"""The rank actor: one Ray actor per rank, placed in its bundle, that runs the trainer entrypoint.

Each actor is its own worker process, so the torch.distributed variables it sets in os.environ are local
to its rank. `run` joins torch.distributed from them (nccl on GPU, gloo on CPU) before calling the
entrypoint, which then finds the default group ready. The actor is threaded (max_concurrency=4) so the
supervisor can read each rank's heartbeat and rank 0's progress, and pass on a preemption notice, while `run` is
busy training.

Preemption: `run` executes in an actor method thread, where Python cannot install signal handlers; `__init__`
runs in the worker process's main thread and installs lctrain's preemption handler there (SIGTERM/SIGUSR1 to the
worker process set the process-wide flag the trainer reads; outside a training loop they do what Ray's handler
does). The supervisor's own notice arrives through :meth:`RankWorker.preempt`.
"""
from __future__ import annotations

import importlib
import os
import random
import socket
from typing import Any, Callable

import ray


def resolve_entrypoint(spec: str) -> Callable[..., Any]:
    """Import "module:function" and return the function (ValueError naming what is missing)."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"launch.entrypoint {spec!r}: cannot import {module_name!r}: {err}") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"launch.entrypoint {spec!r}: {module_name} has no function {func_name!r}")
    return fn


class RankWorker:
    """One rank of the gang (wrapped with ray.remote by the supervisor)."""

    def __init__(self, entrypoint: str) -> None:
        from lctrain.checkpoint import preempt

        self.entrypoint = entrypoint
        preempt.install()

    def preempt(self, reason: str = "preempted by the launcher") -> None:
        """Pass a preemption notice to the training loop (it saves at the next step end and returns)."""
        from lctrain.checkpoint import preempt

        preempt.request(reason)

    def preflight(self) -> dict[str, Any]:
        """Check the entrypoint imports here and report where this actor runs."""
        resolve_entrypoint(self.entrypoint)
        ctx = ray.get_runtime_context()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "pid": os.getpid(), "gpu_ids": gpu_ids}

    def free_port(self, lo: int, hi: int, seed: int) -> int:
        """A port in [lo, hi] that is free on this node now (tried from a seeded start, wrapping around)."""
        ports = list(range(lo, hi + 1))
        start = random.Random(seed).randrange(len(ports))
        for port in ports[start:] + ports[:start]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
                return port
        raise RuntimeError(f"no free port in {lo}..{hi} on {socket.gethostname()}")

    def run(self, cfg: Any, env: dict[str, str], resume: str = "auto") -> Any:
        """Set this rank's environment, join torch.distributed, call the entrypoint with (cfg, resume)."""
        from lctrain.parallel.mesh import init_distributed
        from lctrain.train import heartbeat

        heartbeat.beat(0, "start")  # a phase until the entrypoint's first step
        os.environ.update(env)
        fn = resolve_entrypoint(self.entrypoint)
        parallel = getattr(cfg, "parallel", None)
        # nccl on GPU, gloo on CPU unless parallel.backend says otherwise; the trainer's mesh reuses this group.
        init_distributed(getattr(parallel, "backend", None), getattr(parallel, "timeout_s", 600.0))
        return fn(cfg, resume=resume)

    def heartbeat(self) -> dict[str, Any]:
        """This rank's liveness (lctrain.train.heartbeat.snapshot), answered while `run` is busy."""
        from lctrain.train import heartbeat

        return heartbeat.snapshot()

    def file_size(self, path: str) -> int:
        """Size of `path` in bytes (0 while it does not exist)."""
        try:
            return os.path.getsize(path)
        except OSError:
            return 0

    def read_from(self, path: str, offset: int) -> tuple[bytes, int]:
        """Bytes of `path` from `offset` (from 0 when the file shrank); (b"", 0) while it does not exist."""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return b"", 0
        return data, offset + len(data)
