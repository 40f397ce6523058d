"""The compiled (GPU) path of every kernel, built for Hopper (sm_90) ahead of time, without a GPU.

The interpreter tests check the numbers; these check what only a GPU launch would otherwise reveal, with
Triton's ahead-of-time compiler for an explicit target and its bundled ptxas (`lctrain.kernels.aot`):

- every kernel passes Triton's compiler and ptxas (types, tl.dot shapes, shared memory <= 228 KB);
- 64-bit offsets: the kernel's Triton IR has no 32-bit product of a program-id/loop-derived index and a
  non-constant (stride, length) that feeds a pointer offset (`int32_offset_products`). Such a product is
  what wraps past 2^31 elements (b * s * h * d at 256K local tokens, 64 heads x 128); a tensor that large
  cannot be built on this machine, so the check reads the compiler's IR instead, with the integer
  arguments typed i32 as a launch with small strides would type them. A planted kernel with the old
  `Q + pid * stride` offsets shows the check fails when it should;
- zero register spills (ptxas -v) for every shipped autotune config of the flash backward, bf16 and fp16,
  head dims 64 and 128 (slow: 12 compiles), and of every other kernel in bf16 (slow).
"""
from pathlib import Path

import pytest
import triton
import triton.language as tl

from lctrain.kernels import aot
from lctrain.kernels.utils import triton_kernel

_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not _PTXAS.exists(), reason="this Triton build ships no ptxas")

_SPECS = {spec.name: spec for spec in aot.kernel_specs()}


@pytest.mark.parametrize("name", sorted(_SPECS))
def test_kernel_compiles_with_64_bit_offsets(name):
    spec = _SPECS[name]
    r = aot.report(spec, "bf16", 128, spec.kernel.configs[0])
    assert r.shared <= 228 * 1024
    assert r.registers <= 255
    assert aot.int32_offset_products(r.ttir) == [], f"{name}: 32-bit offset products"


@triton_kernel(configs=[triton.Config({"BLOCK": 64}, num_warps=4)], interpret={"BLOCK": 16})
def _planted_int32_kernel(X, Y, stride_s, stride_h, BLOCK: tl.constexpr):
    # the pattern the kernels used to have: row and head offsets multiplied by strides in int32
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + tl.program_id(1) * stride_h + rows * stride_s)
    tl.store(Y + rows, x)


def test_offset_check_finds_int32_products():
    spec = aot.KernelSpec("planted", _planted_int32_kernel, ("X", "Y"), (), lambda d: {})
    r = aot.report(spec, "bf16", 64, _planted_int32_kernel.configs[0])
    found = aot.int32_offset_products(r.ttir)
    assert len(found) == 2 and all("arith.muli" in line for line in found)


def _spill_free(names, dtypes=aot.DTYPES):
    bad = []
    for name in names:
        spec = _SPECS[name]
        for dtype in dtypes:
            for d in aot.HEAD_DIMS:
                for config in spec.kernel.configs:
                    r = aot.report(spec, dtype, d, config)
                    if r.spills:
                        bad.append(f"{name} {dtype} d={d} {r.config}: {r.registers} registers, "
                                   f"{r.spill_stores}/{r.spill_loads} spill bytes")
    return bad


@pytest.mark.slow
def test_flash_backward_configs_do_not_spill():
    assert _spill_free(["flash_bwd"]) == []


@pytest.mark.slow
def test_other_kernel_configs_do_not_spill():
    # bf16 only (~30 compiles): fp16 allocated the same registers in every config (docs/kernels.md's table)
    assert _spill_free(sorted(set(_SPECS) - {"flash_bwd"}), dtypes=("bf16",)) == []
