"""lctrain.data."""
