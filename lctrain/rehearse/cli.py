"""`lctrain rehearse CONFIG [dotted.key=value ...] --gpus N [--gpus-per-node G] [--rank R] [--steps K]
[--hardware h100|h200|a100-80g] [--resume auto|none|PATH] [--json]`: exit 0 when the rehearsal finds nothing, 1 when
it finds a failure (each named by its source line), 2 for a config or layout `lctrain train` would refuse."""
from __future__ import annotations

import argparse
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    from lctrain.rehearse.rehearsal import HARDWARE

    p = argparse.ArgumentParser(prog="lctrain rehearse",
                                description="Rehearse one rank of an N-GPU training job on CPU (meta tensors, a "
                                            "process group without a CPU backend); see docs/rehearse.md.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (the world size)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: min(N, 8))")
    p.add_argument("--rank", type=int, default=None, help="rank to rehearse (default: the one with the most work)")
    p.add_argument("--steps", type=int, default=3, help="training steps (>= 2; the first is warm-up)")
    p.add_argument("--hardware", default="h100", choices=HARDWARE, help="the GPU the backends dispatch for")
    p.add_argument("--resume", default="auto", help="auto | none | a checkpoint path (the resume decision)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = _parser().parse_intermixed_args(argv)
    from lctrain.config import ConfigError, load_config
    from lctrain.rehearse.rehearsal import rehearse

    try:
        cfg = load_config(args.config, args.overrides)
        report = rehearse(cfg, args.gpus, args.gpus_per_node, args.rank, args.steps, args.hardware, args.resume,
                          config_name=args.config)
    except (ConfigError, ValueError) as err:
        print(f"lctrain rehearse: error: {err}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.text())
    return 0 if report.ok else 1
