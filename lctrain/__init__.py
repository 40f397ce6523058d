"""lctrain: distributed long-context training (sequence-parallel attention, Megatron-core TP, DeepSpeed ZeRO, Ray)."""
import os as _os

__version__ = "0.1.0"

# kernels/ and launch/ are the subpackages lctrain.kernels and lctrain.launch (pyproject's package-dir).
# An installed lctrain maps them; when lctrain is imported straight from a source checkout (python -m from
# the repository root puts it first on sys.path), the checkout root serves the same mapping.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and _root not in __path__:
    __path__.append(_root)
