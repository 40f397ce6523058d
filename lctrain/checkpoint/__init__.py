"""Checkpoints: atomic sharded DCP saves (store) of a layout-independent training state (state)."""
from lctrain.checkpoint.config import CheckpointConfig
from lctrain.checkpoint.store import CheckpointError, find_latest, load_tensors, read_meta, save_checkpoint

__all__ = ["CheckpointConfig", "CheckpointError", "find_latest", "load_tensors", "read_meta", "save_checkpoint"]
