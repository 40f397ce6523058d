"""The pre-reservation job check: everything about a run that can be known before any GPU is reserved.

    problems = preflight(cfg, Target(world_size=16, procs_per_node=8, nodes=2))   # [] when the job can start
    require_preflight(cfg, target)                                                # raises PreflightError

`lctrain train --dry-run`, `lctrain launch` and `lctrain submit` call it before any process group, gang or job
exists, so a config that cannot run at the target scale fails in seconds with every reason at once, instead of
after the cluster was reserved. Each check is a function `(cfg, target) -> list[str]` in `CHECKS`; a check that
needs the result of another (e.g. the DP size) recomputes it and stays quiet when that input is already broken,
so each problem is reported once. No communication, no device, no I/O besides reading the config.

Checks: layout (world divisible by tp*cp, known cp_layout), sequence (seq_len divisible by 2*CP for zigzag, CP
for contiguous), model split (heads, kv heads, vocab, FFN divisible by TP; Ulysses head divisibility; LASP-1's
contiguous layout), batch (global batch divisible by micro-batch x DP), data (vocabulary fits the model), node
shape (ranks per node divisible by TP, so TP groups stay inside a node) and run directory (absolute on multi-node
runs and Ray jobs; whether that path is really shared cannot be seen from here: a simulated cluster on one machine
legitimately uses /tmp) and, on a machine with a GPU, a flash-attn install that fails to import. The
predicted-memory check (issue 12) joins `CHECKS` as one more function.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

from lctrain.config import Config

class PreflightError(ValueError):
    """The run cannot start at the target scale; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("the run cannot start:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Target:
    """Where the run is meant to go: its world size and how the ranks are spread over nodes."""

    world_size: int
    """Total ranks (GPUs): nodes x procs_per_node."""
    procs_per_node: int | None = None
    """Ranks per node, when known (None: a single machine, e.g. `lctrain train --nproc`)."""
    nodes: int = 1
    """Nodes the ranks are spread over."""
    ray_job: bool = False
    """The run is a Ray job: its working directory is a per-node temporary copy, so out_dir must be absolute."""
    one_machine: bool = False
    """Every "node" is this machine (a private local Ray cluster): a relative out_dir is then shared anyway."""
    hardware: str | None = None
    """The GPU the job will run on (a `lctrain.plan` device table: h100, h200, a100-80g); None: env
    LCTRAIN_HARDWARE, else the predicted-memory check is skipped."""

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @classmethod
    def of(cls, world_size: int, procs_per_node: int | None = None, multi_node: bool = False,
           ray_job: bool = False, hardware: str | None = None) -> Target:
        """A target from the world size and, optionally, the ranks per node."""
        nodes = world_size // procs_per_node if procs_per_node and world_size % procs_per_node == 0 else 1
        if multi_node and nodes < 2:
            nodes = 2
        return cls(world_size, procs_per_node, nodes, ray_job, hardware=hardware)


def _error(fn: Callable[[], object]) -> list[str]:
    """Run one of the config's own validators; its ValueError becomes a problem."""
    try:
        fn()
    except ValueError as err:
        return [str(err)]
    return []


def _dp(cfg: Config, target: Target) -> int | None:
    """The DP size, or None when the layout itself is broken (reported by check_layout)."""
    try:
        return cfg.parallel.validate(target.world_size)
    except ValueError:
        return None


def check_target(cfg: Config, target: Target) -> list[str]:
    """World size, ranks per node and node count are positive and agree."""
    out = []
    if target.world_size < 1:
        out.append(f"the world size must be >= 1, got {target.world_size}")
    if target.procs_per_node is not None:
        if target.procs_per_node < 1:
            out.append(f"ranks per node must be >= 1, got {target.procs_per_node}")
        elif target.nodes * target.procs_per_node != target.world_size:
            out.append(f"{target.nodes} node(s) x {target.procs_per_node} rank(s) per node != world size "
                       f"{target.world_size}")
    return out


def check_layout(cfg: Config, target: Target) -> list[str]:
    """world % (tp*cp) == 0 and a known cp_layout / backend (MeshConfig.validate)."""
    if target.world_size < 1:
        return []
    return _error(lambda: cfg.parallel.validate(target.world_size))


def check_sequence(cfg: Config, target: Target) -> list[str]:
    """data.seq_len splits into 2*CP chunks (zigzag) or CP chunks (contiguous)."""
    from lctrain.parallel.sharding import check_shardable

    if cfg.parallel.cp_layout not in ("zigzag", "contiguous") or not isinstance(cfg.parallel.cp, int) \
            or cfg.parallel.cp < 1:
        return []
    return _error(lambda: check_shardable(cfg.data.seq_len, cfg.parallel.cp, cfg.parallel.cp_layout))


def check_model_split(cfg: Config, target: Target) -> list[str]:
    """Heads, kv heads, vocabulary and FFN divide over TP; Ulysses and LASP-1 constraints on CP."""
    if _dp(cfg, target) is None:
        return []
    return _error(lambda: cfg.model.validate_parallel(cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.cp_layout))


def check_settings(cfg: Config, target: Target) -> list[str]:
    """The train / data / checkpoint sections' own validation."""
    return [*_error(cfg.train.validate), *_error(cfg.data.validate), *_error(cfg.checkpoint.validate)]


def check_batch(cfg: Config, target: Target) -> list[str]:
    """train.global_batch_size is a whole number of micro-batches on every DP rank."""
    dp = _dp(cfg, target)
    tc = cfg.train
    if dp is None or tc.micro_batch_size < 1 or tc.global_batch_size < 1:
        return []
    per_step = tc.micro_batch_size * dp
    if tc.global_batch_size % per_step:
        fits = [m for m in range(1, tc.micro_batch_size + 1) if tc.global_batch_size % (m * dp) == 0]
        hint = (f"; e.g. train.micro_batch_size={fits[-1]}" if fits else
                f"; make train.global_batch_size a multiple of {dp} (the DP size)")
        return [f"train.global_batch_size={tc.global_batch_size} is not divisible by train.micro_batch_size x DP "
                f"= {tc.micro_batch_size} x {dp} = {per_step} (DP = world {target.world_size} / "
                f"(tp {cfg.parallel.tp} x cp {cfg.parallel.cp})){hint}"]
    return []


def check_data(cfg: Config, target: Target) -> list[str]:
    """The data source's token ids fit the model's vocabulary."""
    try:
        cfg.data.validate()
        from lctrain.data.sampler import data_vocab_size

        need = data_vocab_size(cfg.data)
    except (ValueError, ImportError, OSError):
        return []  # a corpus prepared on the cluster's storage is not readable from here: checked at start-up
    if need > cfg.model.vocab_size:
        return [f"data.source={cfg.data.source} produces token ids up to {need - 1}, but model.vocab_size is "
                f"{cfg.model.vocab_size}"]
    return []


def check_node_shape(cfg: Config, target: Target) -> list[str]:
    """Ranks are numbered node-major, so a TP group stays inside a node only if TP divides the ranks per node."""
    ppn, tp = target.procs_per_node, cfg.parallel.tp
    if not ppn or ppn < 1 or not isinstance(tp, int) or tp < 1 or _dp(cfg, target) is None:
        return []
    if ppn % tp:
        return [f"parallel.tp={tp} does not divide the {ppn} ranks per node: tensor-parallel groups would span "
                "nodes (TP all-reduces every layer and needs NVLink); use tp in the divisors of procs-per-node"]
    return []


def check_run_dir(cfg: Config, target: Target) -> list[str]:
    """Multi-node runs and Ray jobs write run.out_dir from several hosts / a temporary working directory:
    it must be an absolute path on storage every node sees."""
    if not ((target.multi_node and not target.one_machine) or target.ray_job):
        return []
    out = cfg.run.out_dir
    where = f"a {target.nodes}-node run" if target.multi_node else "a Ray job"
    if not out or not PurePosixPath(out).is_absolute():
        reason = ("every node would write its own copy and resume from different checkpoints"
                  if target.multi_node else "it would land in the job's temporary working directory, "
                  "which Ray deletes and which differs per node")
        return [f"run.out_dir={out!r} is relative; {where} needs an absolute path on a filesystem every node "
                f"mounts (e.g. run.out_dir=/shared/runs/NAME): {reason}"]
    return []


def check_gpu_kernels(cfg: Config, target: Target) -> list[str]:
    """On a machine with a GPU (e.g. `lctrain train --dry-run` on a node): an installed flash-attn that fails to
    import is a problem unless LCTRAIN_ALLOW_KERNEL_FALLBACK=1 (lctrain.ops.attention_flash_attn's rule)."""
    import torch

    if not torch.cuda.is_available():
        return []
    from lctrain.ops import attention_flash_attn

    try:
        attention_flash_attn._interface()
    except RuntimeError as err:
        return [str(err)]
    return []


def check_memory(cfg: Config, target: Target) -> list[str]:
    """Predicted memory per GPU (ZeRO states + activations, lctrain.plan.check) fits the device, when the device
    is known (Target.hardware or env LCTRAIN_HARDWARE)."""
    import os

    hardware = target.hardware or os.environ.get("LCTRAIN_HARDWARE") or None
    if not hardware or _dp(cfg, target) is None:
        return []
    from lctrain.plan.check import memory_problems

    return memory_problems(cfg, target.world_size, hardware)


def check_preemption(cfg: Config, target: Target) -> list[str]:
    """The scheduler's kill delay covers the preemption grace (lctrain.checkpoint.preempt.check_preemption)."""
    from lctrain.checkpoint.preempt import check_preemption as check

    return check(cfg)


#: The checks, in the order their problems are listed. Issue 12's predicted-memory check is appended here.
CHECKS: list[Callable[[Config, Target], list[str]]] = [
    check_target, check_settings, check_layout, check_sequence, check_model_split, check_batch, check_data,
    check_node_shape, check_run_dir, check_gpu_kernels, check_memory, check_preemption,
]


def preflight(cfg: Config, target: Target | int, procs_per_node: int | None = None,
              multi_node: bool = False, ray_job: bool = False) -> list[str]:
    """Every reason `cfg` cannot run at `target` (empty when it can).

    Args:
        cfg: the loaded config (overrides applied).
        target: a Target, or the world size (then `procs_per_node`, `multi_node`, `ray_job` describe it).
    """
    if not isinstance(target, Target):
        target = Target.of(int(target), procs_per_node, multi_node, ray_job)
    problems: list[str] = []
    for check in CHECKS:
        problems += check(cfg, target)
    return problems


def require_preflight(cfg: Config, target: Target | int, **kwargs) -> None:
    """Raise PreflightError listing every problem `preflight` finds."""
    problems = preflight(cfg, target, **kwargs)
    if problems:
        raise PreflightError(problems)


def describe(cfg: Config, target: Target) -> str:
    """One line for a passed check: the layout and the batch geometry at the target."""
    dp = cfg.parallel.validate(target.world_size)
    where = (f"{target.nodes} node(s) x {target.procs_per_node}" if target.procs_per_node
             else f"{target.world_size} rank(s)")
    return (f"world={target.world_size} ({where}) tp={cfg.parallel.tp} cp={cfg.parallel.cp} dp={dp} "
            f"grad_accum={cfg.train.grad_accum(dp)} micro_batch={cfg.train.micro_batch_size} "
            f"global_batch={cfg.train.global_batch_size} seq={cfg.data.seq_len} layout={cfg.parallel.cp_layout} "
            f"out_dir={cfg.run.out_dir}")
