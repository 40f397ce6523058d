"""lctrain.models."""
