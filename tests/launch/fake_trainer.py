"""A small deterministic stand-in for the trainer, used as `launch.entrypoint` by the launcher tests.

`run` trains one float64 scalar with gloo all-reduces (through lctrain.parallel.comm): every step
x <- x - 0.1 * mean_r(x * (r + 1)) / mean_r(r + 1) = 0.9 x, loss = x^2, so the losses are known exactly.
Rank 0 appends to run.out_dir/metrics.jsonl and writes checkpoints/step_N.json every `checkpoint.every`
steps (atomically); resume="auto" continues from the newest one. Every rank beats its heartbeat once per step
(lctrain.train.heartbeat), as the real trainer does; like it, the ranks agree on a preemption notice
(lctrain.checkpoint.preempt) at every step end, save and return `preempted`. The other functions inject faults.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lctrain.checkpoint import preempt
from lctrain.parallel import comm
from lctrain.parallel.mesh import init_distributed
from lctrain.train import heartbeat

STEP_S = 0.3
SLOW_SAVE_S = 45.0


@dataclass
class FakeResult:
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)
    resumed_from: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    preempted: bool = False


def expected_losses(seed: int, steps: int) -> dict[int, float]:
    """The losses `run` must produce for `seed` and `steps`, whatever the world size and restarts."""
    x, out = float(seed % 7 + 1), {}
    for step in range(1, steps + 1):
        x = x - 0.1 * x
        out[step] = x * x
    return out


def _latest(ckpt_dir: Path) -> tuple[int, float] | None:
    steps = sorted(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("step_*.json"))
    if not steps:
        return None
    data = json.loads((ckpt_dir / f"step_{steps[-1]}.json").read_text())
    return data["step"], data["x"]


def run(cfg: Any, resume: str = "auto", fault: str | None = None) -> FakeResult:
    init_distributed("gloo", timeout_s=60.0)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.run.out_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    start, x = 0, float(cfg.train.seed % 7 + 1)
    latest = _latest(ckpt_dir) if resume == "auto" else None
    if latest is not None:
        start, x = latest
    result = FakeResult(final_step=start, resumed_from=start if latest else None,
                        env={k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                        "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")})
    for step in range(start + 1, cfg.train.steps + 1):
        heartbeat.beat(step - 1, None)
        if fault == "crash" and rank == world - 1 and step == start + 3:
            os._exit(3)
        if fault == "hang" and rank == world - 1 and step == start + 2:
            time.sleep(3600)
        g = comm.all_reduce(torch.tensor([x * (rank + 1)], dtype=torch.float64))
        x = x - 0.1 * g.item() / (world * (world + 1) / 2)
        result.losses[step] = x * x
        result.final_step = step
        time.sleep(STEP_S)
        if fault == "slow_save" and cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            with heartbeat.phase("save"):  # a save far longer than launch.progress_timeout_s, on every rank
                if rank == 0:
                    time.sleep(SLOW_SAVE_S)
                comm.barrier()
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": x * x, "tokens": 1, "tokens_per_s": 1.0}) + "\n")
        stop = comm.all_reduce(torch.tensor([int(preempt.requested())]), op=dist.ReduceOp.MAX).item() > 0
        if rank == 0:
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stop:
                tmp = ckpt_dir / f".step_{step}.tmp"
                tmp.write_text(json.dumps({"step": step, "x": x}))
                tmp.rename(ckpt_dir / f"step_{step}.json")
        comm.barrier()
        if stop:
            preempt.clear()
            result.preempted = True
            break
    dist.destroy_process_group()
    return result


def crash(cfg: Any, resume: str = "auto") -> FakeResult:
    """The last rank's process dies at the third step of every attempt (after a checkpoint at the second)."""
    return run(cfg, resume, fault="crash")


def hang(cfg: Any, resume: str = "auto") -> FakeResult:
    """The last rank stops (sleeps) two steps into every attempt; the others wait in a collective."""
    return run(cfg, resume, fault="hang")


def slow_save(cfg: Any, resume: str = "auto") -> FakeResult:
    """Rank 0's checkpoint saves take SLOW_SAVE_S (inside a heartbeat phase) while the others wait."""
    return run(cfg, resume, fault="slow_save")


def bad_config(cfg: Any, resume: str = "auto") -> FakeResult:
    raise ValueError("train.steps must be positive (injected)")
