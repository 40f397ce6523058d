"""Data configuration."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where samples come from and how long they are."""

    source: str = "mqar"
    """mqar | passkey | text."""
    seq_len: int = 256
    micro_batch_size: int = 1
