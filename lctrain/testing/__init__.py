"""Helpers for lctrain's tests and benchmarks: spawned gloo ranks, reference comparisons (imported on first use)."""
from lctrain._lazy import lazy_exports

_EXPORTS = {name: "lctrain.testing.distributed" for name in ("DistributedError", "run_distributed", "shutdown_pools")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
