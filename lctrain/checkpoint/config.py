"""Checkpoint configuration."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    """When to save and how many to keep."""

    every: int = 0
    """Save every this many steps (0 = only at the end / at exit_after)."""
    keep: int = 2
    """Keep the newest k complete checkpoints."""
    at_end: bool = True
    """Save when the run ends (at train.steps or train.exit_after)."""
    async_save: bool = False
    """Write checkpoints in the background (dcp.async_save) while training goes on; the next save (and the
    end of the run) waits for the previous one. Costs a CPU copy of this rank's shard while it is written."""
    init_from: str = ""
    """A fresh run's initial weights: an `lctrain export --format safetensors` directory (`lctrain train
    --init-from DIR`); ignored when the run resumes from a checkpoint."""

    def validate(self) -> None:
        """Raise ValueError for a setting that can't work."""
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")
