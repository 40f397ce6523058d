"""Launcher configuration: the `launch:` section of a run config (restarts, timeouts, ports, resources).

Kept free of lctrain imports so `lctrain.config` can import it without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchConfig:
    """How `lctrain launch` places, supervises and restarts the ranks of a run on a Ray cluster."""

    entrypoint: str = "lctrain.train.trainer:run"
    """Function each rank calls, as "module:function", with (cfg, resume="auto")."""
    max_restarts: int = 3
    """Restarts of the whole gang (from the latest checkpoint) after a rank dies or hangs; then give up."""
    progress_timeout_s: float = 900.0
    """A rank whose heartbeat (one per training step) is older than this is treated as hung."""
    phase_timeout_s: float = 3600.0
    """A rank inside a long phase (init, load, save, eval: it beats from a thread) for longer than this is hung."""
    replacement_timeout_s: float = 120.0
    """After a failure, how long to wait for the cluster to hold the whole gang again (a lost node replaced)
    before restarting on the nodes left (elastic: smaller DP, same global batch)."""
    elastic: bool = True
    """Restart on fewer nodes when a lost node is not replaced within replacement_timeout_s."""
    gang_timeout_s: float = 120.0
    """How long to wait for the cluster to hold every rank at once (all or none) before failing."""
    poll_s: float = 1.0
    """Interval of the supervisor's liveness and progress checks."""
    port_min: int = 29500
    """MASTER_PORT is the first free port in [port_min, port_max] on rank 0's node (open it between nodes)."""
    port_max: int = 29999
    cpus_per_rank: float = 1.0
    """CPUs reserved for each rank (its placement-group bundle)."""
    gpus_per_rank: float | None = None
    """GPUs reserved for each rank; None = 1 when the cluster has GPUs, else 0 (CPU simulation)."""
    termination_grace_s: float = 0.0
    """The scheduler's delay between its stop signal and its kill (Kubernetes terminationGracePeriodSeconds, SLURM
    --signal lead time); 0 = unknown. Checked (--dry-run) >= train.preempt_grace_s + 15 s."""

    def __post_init__(self) -> None:
        if ":" not in self.entrypoint or not all(self.entrypoint.split(":", 1)):
            raise ValueError(f"launch.entrypoint must be 'module:function', got {self.entrypoint!r}")
        if self.max_restarts < 0:
            raise ValueError(f"launch.max_restarts must be >= 0, got {self.max_restarts}")
        for name in ("progress_timeout_s", "phase_timeout_s", "replacement_timeout_s", "gang_timeout_s", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"launch.{name} must be > 0, got {getattr(self, name)}")
        if not 1024 <= self.port_min <= self.port_max <= 65535:
            raise ValueError(f"launch.port_min..port_max must be a range inside 1024..65535, "
                             f"got {self.port_min}..{self.port_max}")
        if self.termination_grace_s < 0:
            raise ValueError(f"launch.termination_grace_s must be >= 0, got {self.termination_grace_s}")
        if self.cpus_per_rank < 0 or (self.gpus_per_rank is not None and self.gpus_per_rank < 0):
            raise ValueError("launch.cpus_per_rank and launch.gpus_per_rank must be >= 0")
