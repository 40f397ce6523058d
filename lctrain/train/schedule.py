"""Learning-rate schedule: linear warmup, then cosine decay to min_lr at the last step.

    lr(s) = lr * (s + 1) / warmup                                         for s < warmup
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2   otherwise

`s` is the 0-based index of the optimizer step being taken. A pure function of the step, so a resumed
run (or one that stops early with train.exit_after) follows the same curve.
"""
from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of a `steps`-long schedule."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
