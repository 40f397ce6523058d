"""Local attention compute: backends (reference, SDPA, flash-attn, Triton) and their dispatch."""
