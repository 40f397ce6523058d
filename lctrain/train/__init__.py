"""lctrain.train."""
