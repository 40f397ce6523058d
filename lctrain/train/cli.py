"""`lctrain train CONFIG [dotted.key=value ...] [--nproc N] [--resume auto|none|PATH] [--resume-from PATH] [--dry-run]`.

Runs in this process when started by a launcher (torchrun sets RANK/WORLD_SIZE) or without --nproc;
with --nproc N it spawns N local ranks (gloo on CPU, nccl on GPU) on a free port and waits for them.
If one rank fails the others are stopped and the exit code is non-zero. SIGTERM (or SIGUSR1) to this process is passed
on to the ranks; a rank that gets one tells the others at the next step end, they save one checkpoint and exit with
lctrain.checkpoint.preempt.REQUEUE_EXIT (75), the code the recipes requeue on (train.preempt_grace_s).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

# Expected on CPU: Megatron's optional fused kernels are absent, and DCP/DeepSpeed call deprecated torch APIs.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from lctrain.config import Config, ConfigError, load_config, to_dict
from lctrain.parallel.mesh import free_port


def _rank_main(local_rank: int, nproc: int, port: int, threads: int, cfg: Config, resume: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    code = _run_here(cfg, resume)
    if code:
        sys.exit(code)


def _run_here(cfg: Config, resume: str) -> int:
    """Train in this process; the exit code: 0, or REQUEUE_EXIT when the run stopped on a preemption notice."""
    import torch.distributed as dist

    from lctrain.checkpoint.preempt import REQUEUE_EXIT
    from lctrain.train.trainer import run

    try:
        result = run(cfg, resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return REQUEUE_EXIT if result.preempted else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lctrain train", description="Train a model (local ranks or under torchrun).")
    p.add_argument("config", help="YAML config (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. parallel.cp=2 train.steps=10")
    p.add_argument("--nproc", type=int, default=None, help="spawn N local ranks (default: run in this process)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in run.out_dir, default) | none | a checkpoint path")
    p.add_argument("--resume-from", default=None, metavar="PATH", help="resume from this checkpoint (= --resume PATH)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start a fresh run from the weights of an `lctrain export` directory (checkpoint.init_from)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the pre-reservation check (lctrain.preflight) at the target world size, then exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the target world size (e.g. nodes x GPUs per node; default: --nproc or 1)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="with --dry-run: ranks per node (fewer than the world = multi-node: out_dir must be absolute)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    resume = args.resume_from or args.resume
    if args.init_from:
        args.overrides.append(f"checkpoint.init_from={args.init_from}")
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.nproc is not None and args.nproc < 1:
        print("lctrain train: --nproc must be >= 1", file=sys.stderr)
        return 2
    if (args.world_size is not None or args.procs_per_node is not None) and not args.dry_run:
        print("lctrain train: --world-size / --procs-per-node only describe the target of --dry-run", file=sys.stderr)
        return 2
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else (args.world_size or args.nproc or 1)
    per_node = (int(os.environ.get("LOCAL_WORLD_SIZE", world)) if under_launcher
                else (args.procs_per_node or args.nproc or world))
    try:
        cfg = load_config(args.config, args.overrides)
        from lctrain.preflight import Target, require_preflight
        from lctrain.train.trainer import plan_run, resolve_resume

        require_preflight(cfg, Target.of(world, per_node))
        plan = plan_run(cfg, world)
        ckpt = resolve_resume(resume, Path(cfg.run.out_dir) / "checkpoints")
    except (ConfigError, ValueError) as err:
        print(f"lctrain train: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        print(f"# layout: world={plan.world} tp={plan.tp} cp={plan.cp} dp={plan.dp} "
              f"grad_accum={plan.grad_accum} (global batch {cfg.train.global_batch_size} x seq {cfg.data.seq_len})")
        print(f"# resume: {ckpt if ckpt is not None else 'none (fresh start)'}")
        print("# config and layout OK")
        return 0
    if under_launcher or args.nproc is None:
        return _run_here(cfg, resume)
    import signal

    import torch.multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    ctx = mp.start_processes(_rank_main, args=(args.nproc, free_port(), threads, cfg, resume), nprocs=args.nproc,
                             join=False, start_method="spawn")

    def forward_sigterm(signum, frame) -> None:
        # A scheduler may signal only this process: pass SIGTERM on so the ranks save and exit together.
        for proc in ctx.processes:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    from lctrain.checkpoint.preempt import REQUEUE_EXIT, SIGNALS

    previous = {sig: signal.signal(sig, forward_sigterm) for sig in SIGNALS}
    try:
        while not ctx.join():
            pass
    except mp.ProcessExitedException as err:
        if err.exit_code == REQUEUE_EXIT:
            print(f"lctrain train: preempted; the checkpoint is saved, exiting with {REQUEUE_EXIT} (requeue)",
                  file=sys.stderr)
            return REQUEUE_EXIT
        print(f"lctrain train: rank {err.error_index} exited with code {err.exit_code}; stopped the others",
              file=sys.stderr)
        return 1
    except mp.ProcessRaisedException as err:
        print(f"lctrain train: rank {err.error_index} failed:\n{err}", file=sys.stderr)
        return 1
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 0
