"""Checkpoints: atomic, checksummed DCP saves (store) of each rank's shard of the training state (state).

The names below are imported on first use (lctrain._lazy): the config stays cheap to import without DCP."""
from lctrain._lazy import lazy_exports

_EXPORTS = {"CheckpointConfig": "lctrain.checkpoint.config"}
_EXPORTS.update({name: "lctrain.checkpoint.store" for name in (
    "Checkpointer", "CheckpointError", "find_latest", "load_state", "load_tensors", "read_meta", "save_checkpoint",
    "scan_latest")})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
