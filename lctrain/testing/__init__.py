"""Helpers for lctrain's tests and benchmarks: spawned gloo ranks, reference comparisons."""
from lctrain.testing.distributed import DistributedError, run_distributed, shutdown_pools

__all__ = ["DistributedError", "run_distributed", "shutdown_pools"]
