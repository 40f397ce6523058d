"""The compiled (GPU) path of every kernel builds for Hopper (sm_90) down to a cubin, without a GPU.

The interpreter tests check the numbers; this checks what only a GPU launch would otherwise reveal:
that each kernel passes Triton's compiler (types, shapes, tl.dot constraints) and ptxas, in bf16 with a
Hopper autotune config. It uses Triton's ahead-of-time `triton.compile` with an explicit target, so no
driver is touched.
"""
from pathlib import Path

import pytest
import triton

from lctrain.kernels.flash_attention import triton as flash
from lctrain.kernels.lightning_attention import chunk as lightning

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
_LIGHTNING_TYPES = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "OUT": "*bf16", "LOG_DECAY": "*fp32", "X0": "*fp32",
                    "XN": "*fp32", "LOCAL": "*fp32"}
_LIGHTNING_CONSTS = dict(HAS_X0=True, STORE_XN=True, REVERSE=True, PRECISION="tf32", BLOCK_A=128, BLOCK=64,
                         BLOCK_C=64)
_FLASH_TYPES = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
                "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "scale": "fp32"}
_FLASH_CONSTS = dict(CAUSAL=True, PRECISION="tf32", BLOCK_D=128, BLOCK_M=64, BLOCK_N=64)


@pytest.mark.skipif(not _PTXAS.exists(), reason="this Triton build ships no ptxas")
@pytest.mark.parametrize("kernel,types,consts", [
    (lightning._forward_kernel, _LIGHTNING_TYPES, _LIGHTNING_CONSTS),
    (lightning._reverse_kernel, _LIGHTNING_TYPES, _LIGHTNING_CONSTS),
    (lightning._boundary_kernel, _LIGHTNING_TYPES, _LIGHTNING_CONSTS),
    (flash._forward_kernel, _FLASH_TYPES, _FLASH_CONSTS),
    (flash._backward_dkdv_kernel, _FLASH_TYPES, _FLASH_CONSTS),
    (flash._backward_dq_kernel, _FLASH_TYPES, _FLASH_CONSTS),
], ids=["lightning_fwd", "lightning_reverse", "lightning_boundary", "flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq"])
def test_kernel_compiles_for_hopper(kernel, types, consts):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kernel.fn)
    consts = {name: value for name, value in consts.items() if name in fn.arg_names}
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=8, num_stages=2))
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 228 * 1024
