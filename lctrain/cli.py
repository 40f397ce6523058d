"""The `lctrain` command: one subcommand per capability, each parsed by the module that implements it.

    lctrain train CONFIG.yaml [dotted.key=value ...] [--nproc N]
    lctrain launch CONFIG.yaml --nodes N --procs-per-node G [--address ADDR]
    lctrain submit CONFIG.yaml --address http://HEAD:8265 ...
    lctrain job status|logs|stop ID
    lctrain export RUN_DIR|CHECKPOINT --out DIR [--format safetensors|hf] [--dtype bf16|fp32]
    lctrain data prepare ...      lctrain plot RUN_DIR      lctrain bench sp ...
    lctrain rehearse CONFIG.yaml --gpus N [--rank R] [--steps K] [--hardware h100] [--json]
"""
from __future__ import annotations

import importlib
import os
import sys

#: subcommand -> "module:function"; the function takes the remaining argv and returns an exit code.
COMMANDS = {
    "train": ("lctrain.train.cli:main", "train a model (locally, N ranks, or under torchrun)"),
    "launch": ("lctrain.launch.cli:launch_main", "run a training job on a Ray cluster"),
    "submit": ("lctrain.launch.cli:submit_main", "submit a training job through Ray's Job Submission API"),
    "job": ("lctrain.launch.cli:job_main", "status, logs or stop of a submitted job"),
    "data": ("lctrain.data.cli:main", "prepare (text/JSONL/Parquet -> token shards) and pack corpora"),
    "plot": ("lctrain.train.plot:main", "plot a run's loss/accuracy curves to PNG"),
    "bench": ("lctrain.bench:main", "benchmarks (sequence-parallel attention)"),
    "plan": ("lctrain.plan.cli:main", "predict memory, step time and tokens/s of a job at 8-1024 GPUs"),
    "export": ("lctrain.checkpoint.export:main", "export a checkpoint to safetensors / Hugging Face (Llama)"),
    "rehearse": ("lctrain.rehearse.cli:main", "run one rank of an N-GPU job on CPU (meta tensors): memory, syncs"),
}


def _usage() -> str:
    lines = ["usage: lctrain COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lctrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "rehearse":
        # torch's C++ log warns once per fake process group torn down; read when torch loads, so set it first.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
