"""Triton kernels for the local compute; each kernel has a plain-PyTorch reference beside it."""
