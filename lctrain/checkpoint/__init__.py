"""Checkpoints: atomic, checksummed DCP saves (store) of each rank's shard of the training state (state)."""
from lctrain.checkpoint.config import CheckpointConfig
from lctrain.checkpoint.store import (Checkpointer, CheckpointError, find_latest, load_state, load_tensors, read_meta,
                                      save_checkpoint, scan_latest)

__all__ = ["CheckpointConfig", "CheckpointError", "Checkpointer", "find_latest", "load_state", "load_tensors",
           "read_meta", "save_checkpoint", "scan_latest"]
