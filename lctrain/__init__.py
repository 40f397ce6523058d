"""lctrain: distributed long-context training (sequence-parallel attention, Megatron-core TP, DeepSpeed ZeRO, Ray).

kernels/ and launch/ are the subpackages lctrain.kernels and lctrain.launch through pyproject's package-dir:
an editable install (`pip install -e .`) maps them with setuptools' import finder, a wheel contains them.
Subpackages import their heavy dependencies (Megatron, DeepSpeed, Ray, DCP) where they are used (lctrain._lazy).
"""
import warnings

__version__ = "0.1.0"

# Megatron-core warns at import that TransformerEngine / Apex are absent and it uses its local implementations.
# lctrain uses neither (its own layers and DeepSpeed's optimizers), so nothing a user could do about it.
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
