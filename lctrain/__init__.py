"""lctrain: distributed long-context training (sequence-parallel attention, Megatron-core TP, DeepSpeed ZeRO, Ray).

kernels/ and launch/ are the subpackages lctrain.kernels and lctrain.launch through pyproject's package-dir:
an editable install (`pip install -e .`) maps them with setuptools' import finder, a wheel contains them.
"""

__version__ = "0.1.0"
