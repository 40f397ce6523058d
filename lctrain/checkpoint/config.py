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
