"""One GPU command (`make gpu-check`): install what the image lacks, run the GPU tests and benchmarks, write docs.

    python scripts/gpu_check.py [--dry-run] [--wheels .whl] [--out docs/gpu_check.md]

On a CUDA machine, in the repository root, within about 10 minutes:
1. installs the wheels carried in `--wheels` (made here by `make gpu-wheels`: flash-linear-attention,
   megatron-core) into a private folder put on PYTHONPATH, and lctrain itself (editable, no index);
2. runs the GPU-marked tests (`pytest -m gpu tests/kernels`);
3. runs the kernel benchmark (benchmarks/bench_kernels.py: ours vs the strongest peer of the same run)
   and `lctrain bench sp` (under torchrun with NCCL on every GPU when there are several, else one rank);
4. writes the tables with device, date and command into `--out` (every step shares a 570 s budget).
Without CUDA (or with --dry-run) it prints those commands and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(args: argparse.Namespace, gpus: int, python: str = sys.executable) -> list[tuple[str, list[str]]]:
    """(title, command) pairs that a GPU run executes, in order."""
    steps = []
    wheels = sorted(Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    if wheels:
        steps.append(("install carried wheels", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                                 "--no-compile", "--upgrade", "--target", args.site,
                                                 *map(str, wheels)]))
    steps.append(("install lctrain", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-build-isolation", "-e", str(ROOT)]))
    steps.append(("GPU tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels",
                                "-p", "no:cacheprovider"]))
    steps.append(("kernel benchmark", [python, "benchmarks/bench_kernels.py", "--out", args.kernel_table,
                                       "--seqlens", *map(str, args.seqlens), "--rep", "10"]))
    bench_sp = ["-m", "lctrain", "bench", "sp", "--dtype", "bfloat16", "--seq", "4096", "16384",
                "--heads", "16", "--dim", "128"]
    if gpus > 1:
        steps.append((f"SP benchmark ({gpus} GPUs, NCCL)", [python, "-m", "torch.distributed.run",
                                                            f"--nproc-per-node={gpus}", *bench_sp]))
    else:
        steps.append(("SP benchmark (1 GPU)", [python, *bench_sp, "--world", "1"]))
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels")
    parser.add_argument("--site", default="/tmp/lctrain-site", help="where the wheels are installed")
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpu_check.md"))
    parser.add_argument("--kernel-table", default=str(ROOT / "docs" / "kernel_benchmarks.md"))
    parser.add_argument("--seqlens", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all steps together")
    args = parser.parse_args(argv)
    try:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    steps = plan(args, max(gpus, 1))
    if args.dry_run or gpus == 0:
        print("gpu_check: " + ("dry run" if args.dry_run else "no CUDA GPU here") + "; on a GPU machine it runs:")
        for title, cmd in steps:
            print(f"  # {title}\n  {shlex.join(cmd)}")
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, str(ROOT), env.get("PYTHONPATH", "")) if p)
    device = torch.cuda.get_device_name()
    sections, failed = [], 0
    deadline = time.time() + args.budget
    for title, cmd in steps:
        start = time.time()
        try:
            result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=max(1.0, deadline - start))
        except subprocess.TimeoutExpired as e:  # out of time: keep what it printed, say so
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            result = subprocess.CompletedProcess(cmd, 124, out, f"\n(stopped: the {args.budget:.0f} s budget ran out)")
        took = time.time() - start
        print(f"== {title}: exit {result.returncode} in {took:.0f} s\n{result.stdout[-4000:]}{result.stderr[-2000:]}",
              flush=True)
        failed += result.returncode != 0
        sections.append(f"## {title}\n\nCommand: `{shlex.join(cmd)}` (exit {result.returncode}, {took:.0f} s)\n\n"
                        f"```\n{(result.stdout + result.stderr)[-6000:].strip()}\n```\n")
    Path(args.out).write_text(f"# GPU check\n\nDevice: {device} x {gpus}. Date: "
                              f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')}. "
                              f"Command: `make gpu-check`.\n\n" + "\n".join(sections))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
