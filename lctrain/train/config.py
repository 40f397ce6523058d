"""Training-loop configuration."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    steps: int = 100
    """Length of the whole training (defines the LR schedule)."""
    seed: int = 1234
    exit_after: int = 0
    """End this run after this many steps (with a checkpoint) without changing the schedule; 0 = never."""
