"""Lazy package exports (PEP 562): `from lctrain.models import build_model` imports lctrain.models.hybrid -- and
Megatron with it -- only when the name is first used, so `import lctrain.config` (and `--dry-run`) stays cheap.

    __getattr__, __dir__ = lazy_exports(__name__, {"build_model": "lctrain.models.hybrid", ...})
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, which exports each name from its module."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
