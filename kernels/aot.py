"""Ahead-of-time compile of lctrain's Triton kernels for Hopper (sm_90) on a machine without a GPU.

Two checks of the compiled GPU path that need no GPU:

- **Registers and spills.** Each kernel and autotune config is compiled with Triton's compiler for
  `GPUTarget("cuda", 90, 32)`; its PTX is assembled again with Triton's own ptxas and `-v`, whose report
  gives registers per thread and spill stores/loads in bytes (a GPU launch would report the same as
  `n_regs`/`n_spills`). `python -m lctrain.kernels.aot` prints the table that docs/kernels.md carries.
- **64-bit offsets.** `int32_offset_products(ttir)` reads the kernel's Triton IR and lists every 32-bit
  multiplication of a value derived from a program id or a loop index by a non-constant (a stride, a
  length) whose result flows into a pointer offset: such a product passes 2^31 at long sequences and
  wraps. The kernels form those products in int64 (`kernels/utils.py:head_ptr`, `row_block_ptrs`).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton

from lctrain.kernels.utils import TritonKernel

#: Head dims and input dtypes every shipped config must compile for without spills.
HEAD_DIMS = (64, 128)
DTYPES = ("bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel with how to type its arguments for an AOT compile.

    Attributes:
        name: short name for tables.
        kernel: the `TritonKernel`.
        pointers: pointer arguments holding the input dtype; others listed in `float32_pointers`.
        float32_pointers: pointer arguments that are float32 whatever the input dtype.
        constants: constexpr arguments other than block sizes, per head dim `d` (a function of d).
    """
    name: str
    kernel: TritonKernel
    pointers: tuple[str, ...]
    float32_pointers: tuple[str, ...]
    constants: Any


@dataclasses.dataclass(frozen=True)
class Report:
    """ptxas's resource report for one compiled kernel config."""
    kernel: str
    dtype: str
    head_dim: int
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    ttir: str = dataclasses.field(repr=False, default="")

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def kernel_specs() -> list[KernelSpec]:
    """Every kernel lctrain ships, with its argument types."""
    from lctrain.kernels.flash_attention import triton as flash
    from lctrain.kernels.lightning_attention import chunk as lightning

    flash_consts = lambda d: dict(CAUSAL=True, PRECISION="tf32", BLOCK_D=d)  # noqa: E731
    specs = [
        KernelSpec("flash_fwd", flash._forward_kernel, ("Q", "K", "V", "O"), ("LSE",), flash_consts),
        KernelSpec("flash_bwd", flash._backward_kernel, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA", "DQ"),
                   flash_consts),
    ]
    specs += lightning.aot_specs(KernelSpec)
    return specs


def compile_sm90(spec: KernelSpec, dtype: str, head_dim: int, config: triton.Config):
    """Compile one kernel config for sm_90 (no driver touched); returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(spec.kernel.fn)
    consts = {**spec.constants(head_dim), **config.kwargs}
    consts = {name: value for name, value in consts.items() if name in fn.arg_names}
    types = {name: f"*{dtype}" for name in spec.pointers}
    types.update({name: "*fp32" for name in spec.float32_pointers})
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            signature[name] = "fp32" if name in ("scale",) else "i32"
    # what a launch specialises on: 16-byte aligned pointers, strides divisible by 16 (bshd with d % 16 == 0);
    # lengths and head dims are left unspecialised (the general case)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name.startswith("stride")}
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the PTX, for sm_90a as Triton builds."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([get_ptxas(90).path, "-v", f"--gpu-name={sm_arch_from_capability(90)}", str(src),
                                 "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def config_name(config: triton.Config) -> str:
    blocks = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks}, warps={config.num_warps}, stages={config.num_stages}"


def report(spec: KernelSpec, dtype: str, head_dim: int, config: triton.Config) -> Report:
    """Compile one config and read its registers, spills and shared memory."""
    compiled = compile_sm90(spec, dtype, head_dim, config)
    registers, stores, loads = ptxas_usage(compiled.asm["ptx"])
    return Report(spec.name, dtype, head_dim, config_name(config), registers, stores, loads,
                  compiled.metadata.shared, compiled.asm["ttir"])


_DEF = re.compile(r"^\s*(?P<lhs>%[^=]+?)\s*=\s*(?P<op>[\w.]+)\b(?P<rest>.*)$")
_NAME = re.compile(r"%[\w$.-]+")


def _base(name: str) -> str:
    return re.split(r"[:#]", name)[0]


def int32_offset_products(ttir: str) -> list[str]:
    """The 32-bit products that can overflow a pointer offset: lines of `ttir` (Triton IR, text).

    A product is reported when it is a 32-bit `arith.muli` (scalar or tensor) that flows into the offset of
    a `tt.addptr`, one factor derives from `tt.get_program_id` or an `scf.for` induction variable (a block,
    row or head index), and the other is a `stride*` argument, or either factor is itself computed from a
    32-bit product by a non-constant (a stride formed in the kernel, `t * H * D`). Allowed: products by
    constants (block sizes), an index times one length argument (segment x segment length, kv head x
    group size: both below the sequence length or head count), additions. Loop bounds are not followed
    (an induction variable counts as an index whatever bounds it has).
    """
    defs: dict[str, tuple[str, list[str], str]] = {}  # name -> (op, operand names, line)
    addptr_offsets: list[str] = []
    tainted: set[str] = set()
    for raw in ttir.splitlines():
        line = raw.split(" loc(")[0]
        match = _DEF.match(line)
        if not match:
            continue
        op, rest = match.group("op"), match.group("rest")
        names = [_base(n) for n in _NAME.findall(match.group("lhs"))]
        if op == "scf.for":
            iv = re.match(r"\s*(%[\w$.-]+)\s*=", rest)
            tainted.add(_base(iv.group(1)))
            for arg, init in re.findall(r"(%[\w$.-]+) = (%[\w$.#-]+)", rest.split("iter_args", 1)[-1]):
                defs[_base(arg)] = ("iter_arg", [_base(init)], line)
            operands: list[str] = []
        else:
            operands = [_base(n) for n in _NAME.findall(rest.split(" : ")[0])]
        for name in names:
            defs[name] = (op, operands, line)
        if op == "tt.get_program_id":
            tainted.update(names)
        if op == "tt.addptr" and len(operands) == 2:
            addptr_offsets.append(operands[1])
    changed = True
    while changed:
        changed = False
        for name, (_, operands, _) in defs.items():
            if name not in tainted and any(o in tainted for o in operands):
                tainted.add(name)
                changed = True
    reaching: set[str] = set()
    stack = list(addptr_offsets)
    while stack:
        name = stack.pop()
        if name in reaching:
            continue
        reaching.add(name)
        stack.extend(defs.get(name, ("", [], ""))[1])
    def is_i32_product(name: str) -> bool:
        op, operands, line = defs.get(name, ("", [], ""))
        return (op == "arith.muli" and bool(re.search(r":\s*(tensor<[^>]*x)?i32\b", line))
                and not any(defs.get(o, ("",))[0] == "arith.constant" for o in operands))

    def has_product(name: str, seen: set[str]) -> bool:
        # an i32 product by a non-constant among the values `name` is computed from
        if name in seen:
            return False
        seen.add(name)
        return is_i32_product(name) or any(has_product(o, seen) for o in defs.get(name, ("", []))[1])

    def from_stride(name: str, seen: set[str]) -> bool:
        # a `stride*` kernel argument, or a value computed from one (splat, broadcast, ...)
        if name in seen:
            return False
        seen.add(name)
        return name.startswith("%stride") or any(from_stride(o, seen) for o in defs.get(name, ("", []))[1])

    found = []
    for name in sorted(reaching):
        if not is_i32_product(name):
            continue
        operands, line = defs[name][1], defs[name][2]
        index = [o for o in operands if o in tainted]
        other = [o for o in operands if o not in tainted]
        if not index:
            continue
        # index x stride, or index x length x length (a stride formed in the kernel, e.g. t * H * D):
        # an index times one length (segment * segment length, kv head * group size) stays below 2^31
        if any(from_stride(o, set()) for o in other) or any(has_product(o, set()) for o in index + other):
            found.append(line.strip())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sm_90 registers/spills of every shipped kernel config")
    parser.add_argument("--kernels", nargs="*", help="kernel names (default: all)")
    args = parser.parse_args(argv)
    print(f"Triton {triton.__version__}, target sm_90a, ptxas from Triton's package\n")
    print("| kernel | dtype | head dim | config | registers | spill bytes (st/ld) | shared KB "
          "| int32 offset products |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in kernel_specs():
        if args.kernels and spec.name not in args.kernels:
            continue
        for dtype in DTYPES:
            for d in HEAD_DIMS:
                for config in spec.kernel.configs:
                    r = report(spec, dtype, d, config)
                    print(f"| {r.kernel} | {dtype} | {d} | {r.config} | {r.registers} | "
                          f"{r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.0f} | "
                          f"{len(int32_offset_products(r.ttir))} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
