"""lctrain.checkpoint."""
