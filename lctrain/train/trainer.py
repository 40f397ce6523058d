"""The training loop: mesh -> model -> DeepSpeed engine -> steps over the global sample stream -> checkpoints.

    from lctrain.train.trainer import run
    result = run(cfg, resume="auto")      # in every rank (RANK/WORLD_SIZE/MASTER_* set), or one process

One optimizer step consumes the `global_batch_size` samples that start at the data position (a global
sample index; see lctrain.data.sampler): each DP rank takes its micro-batches, each CP rank keeps its
slice of every sequence (`shard_sequence`, with the matching global position ids). The loss of a
micro-batch is its summed token loss divided by the token count of the WHOLE step over all DP x CP ranks
(`global_token_mean` with the step's count; DeepSpeed's 1/accumulation scaling is switched off), so the
step's gradient is exactly that of the mean token loss of the global batch, whatever the layout.

Resume: "auto" continues from the newest complete checkpoint in run.out_dir/checkpoints (if any),
"none" starts fresh, a path resumes from that checkpoint (any layout; see lctrain.checkpoint.state). Rank 0
chooses the checkpoint (verifying its sha256 manifest) and broadcasts the choice; newer checkpoints it had to
skip are reported loudly (a warning, and a `resume_fallback` record in metrics.jsonl). Each rank reads only
the pieces of the state it owns under the new layout and saves only the pieces it owns (sharded DCP).

Preemption: with train.preempt_grace_s > 0, a notice (SIGTERM or SIGUSR1 to any rank, or the Ray supervisor's
`preempt` call; lctrain.checkpoint.preempt) makes the ranks agree at the end of the next step that reads the device
anyway -- a log step (train.log_every), an eval or a save step -- (one 4-byte all-reduce there, on the training
device; other steps issue no host sync), save one checkpoint and return with `preempted` set (the CLI then
exits with preempt.REQUEUE_EXIT, the code the recipes requeue on); a watchdog ends the process with code 1 if that
takes longer than the grace period (under torchrun at most 28 s: torchrun kills its workers 30 s after SIGTERM).
Liveness for a supervisor goes through lctrain.train.heartbeat (a beat per step; saves and evals are phases).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lctrain.checkpoint import preempt as notices
from lctrain.checkpoint.state import finish_load, prepare_load, sharded_state
from lctrain.checkpoint.store import (Checkpointer, CheckpointError, check_complete, checkpoint_name, find_latest,
                                      lineage_candidates, load_state, load_tensors, mark_corrupt, parse_name,
                                      read_meta, stored_tensors, verify_share)
from lctrain.config import Config, save_config, to_dict
from lctrain.models import build_model
from lctrain.models.config import ModelConfig
from lctrain.models.loss import global_token_mean
from lctrain.data.sampler import build_dataset, collate, data_vocab_size, micro_batch_indices
from lctrain.parallel import comm
from lctrain.parallel.mesh import Mesh, init_mesh
from lctrain.parallel.sharding import check_shardable, position_ids, shard_sequence
from lctrain.train import heartbeat
from lctrain.train.engine import build_engine, deepspeed_config, set_lr
from lctrain.train.metrics import MetricsLogger, peak_flops
from lctrain.train.schedule import lr_at


@dataclass
class TrainResult:
    """What a run returns on every rank."""

    final_step: int
    """Optimizer steps done in total (including those before a resume)."""
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step run in THIS process (step -> global token-mean loss)."""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    """step -> {"eval_loss", "eval_acc"} of each evaluation."""
    run_dir: str = ""
    checkpoint: str | None = None
    """The last checkpoint written, if any."""
    resumed_from: str | None = None
    """The checkpoint this run started from, if any."""
    position: int = 0
    """Global index of the next training sample."""
    tokens_per_s: float = 0.0
    """Mean training throughput of this run (all ranks together)."""
    preempted: bool = False
    """The run ended early on SIGTERM, after saving a checkpoint."""
    save_s: list[float] = field(default_factory=list)
    """Seconds the training loop was blocked by each checkpoint save (an async save: the staging copy)."""


@dataclass
class Plan:
    """The layout a config resolves to on a given world size."""

    world: int
    tp: int
    cp: int
    dp: int
    grad_accum: int


def plan_run(cfg: Config, world_size: int) -> Plan:
    """Validate `cfg` against `world_size` without any communication; raise ValueError naming the problem."""
    cfg.train.validate()
    cfg.data.validate()
    cfg.checkpoint.validate()
    dp = cfg.parallel.validate(world_size)
    check_shardable(cfg.data.seq_len, cfg.parallel.cp, cfg.parallel.cp_layout)
    grad_accum = cfg.train.grad_accum(dp)
    deepspeed_config(cfg.train, grad_accum)
    if hasattr(cfg.model, "validate_parallel"):
        cfg.model.validate_parallel(cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.cp_layout)
    if data_vocab_size(cfg.data) > cfg.model.vocab_size:
        raise ValueError(f"data.source={cfg.data.source} produces token ids up to {data_vocab_size(cfg.data) - 1}, "
                         f"but model.vocab_size is {cfg.model.vocab_size}")
    return Plan(world_size, cfg.parallel.tp, cfg.parallel.cp, dp, grad_accum)


def _world_size() -> int:
    return torch.distributed.get_world_size() if comm.is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def resolve_resume(resume: str, ckpt_root: Path, verify: bool = True) -> Path | None:
    """The checkpoint to start from: None for "none" or an empty run, the newest complete one of the current
    lineage for "auto" (lctrain.checkpoint.store), else the given path (CheckpointError, naming it, if it is missing
    or damaged). One process, no communication (the training ranks verify in parallel: :func:`choose_checkpoint`)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(ckpt_root, verify=verify)
    path = Path(resume)
    read_meta(path, verify=verify)
    return path


def _control_device() -> torch.device:
    """Where the trainer's control-plane collectives put their tensors: the training device (NCCL has no CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def choose_checkpoint(resume: str, ckpt_root: Path,
                      device: torch.device | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Pick the checkpoint to resume and verify it in parallel; every rank returns the same choice.

    Rank 0 proposes the next candidate that passes the cheap checks (manifest parses, file sizes; for "auto" the
    current lineage newest first) and broadcasts it ([status, step, branch], 24 bytes); each rank verifies the
    sha256 of its share of the files (store.assigned_files: size / N per rank) and one 4-byte all-reduce sums the
    failures. A corrupt candidate is marked (it no longer counts toward checkpoint.keep) and, for "auto", the next
    one is tried; an explicit path raises. Collectives run on `device` (default: the training device).

    Returns:
        (the checkpoint or None, the newer checkpoints skipped with the reason; reasons known on rank 0).
    Raises:
        CheckpointError: an explicit `resume` path that is missing or corrupt (on every rank).
    """
    if resume == "none":
        return None, []
    device = device if device is not None else _control_device()
    dist_on = comm.is_distributed()
    rank = torch.distributed.get_rank() if dist_on else 0
    world = torch.distributed.get_world_size() if dist_on else 1
    explicit = resume != "auto"
    candidates = [Path(resume)] if explicit else (lineage_candidates(ckpt_root) if rank == 0 else [])
    skipped: list[tuple[Path, str]] = []
    i = 0
    while True:
        # status 0 = start fresh, 1 = candidate (step, branch), 2 = the explicit path, 3 = explicit path rejected
        choice = torch.zeros(3, dtype=torch.int64)
        error = None
        if rank == 0:
            while i < len(candidates):
                try:
                    check_complete(candidates[i])
                except CheckpointError as err:
                    if explicit:
                        choice[0], error = 3, err
                        break
                    skipped.append((candidates[i], str(err)))
                    i += 1
                    continue
                choice[:] = torch.tensor([2, 0, 0] if explicit else [1, *parse_name(candidates[i].name)])
                break
        if dist_on:
            choice = comm.broadcast(choice.to(device), src=0).cpu()
        status, step, branch = (int(v) for v in choice)
        if status == 3:
            raise error if error is not None else CheckpointError(
                f"checkpoint {resume!r} is missing or corrupt (rank 0 rejected it; see its error)")
        if status == 0:
            return None, skipped
        path = Path(resume) if explicit else ckpt_root / checkpoint_name(step, branch)
        problems = verify_share(path, read_meta(path, verify=False), rank, world)
        for p in problems:
            warnings.warn(f"rank {rank}: {p}", stacklevel=2)
        bad = torch.tensor([len(problems)], dtype=torch.int32, device=device)
        if dist_on:
            bad = comm.all_reduce(bad)
        n_bad = int(bad.item())
        if n_bad == 0:
            return path, skipped
        why = (problems[0] if problems else f"checkpoint {str(path)!r} is corrupt") + (
            f" ({n_bad} file(s) in all failed their sha256 check)")
        if explicit:
            raise CheckpointError(why)
        if rank == 0:
            mark_corrupt(path, why)
            skipped.append((path, why))
        i += 1


def _rng_names(rank: int) -> dict[str, torch.Tensor]:
    out = {f"rng/rank{rank}/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out[f"rng/rank{rank}/cuda"] = torch.cuda.get_rng_state()
    return out


def _restore_rng(path: Path, meta: dict, rank: int, world: int) -> None:
    """Every rank's RNG streams, deterministically whatever the world size (collective: every rank calls it).

    Rank r continues the stream saved by rank r when the checkpoint has one (the same world, or a shrink: the
    surviving ranks keep theirs); a rank the checkpoint never had (growing) starts a stream seeded by
    (train.seed, step, rank), so the same resume gives the same streams every time.
    """
    available = stored_tensors(path)
    names = [n for n in _rng_names(rank) if n in available]
    got = load_tensors(path, names)  # collective even when empty
    if f"rng/rank{rank}/cpu" in got:
        torch.set_rng_state(got[f"rng/rank{rank}/cpu"])
    else:
        seed = int(meta.get("config", {}).get("train", {}).get("seed", 0))
        torch.manual_seed((seed * 1_000_003 + int(meta["step"]) * 7_919 + rank) % (2**63 - 1))
    if f"rng/rank{rank}/cuda" in got:
        torch.cuda.set_rng_state(got[f"rng/rank{rank}/cuda"])


def _batch_to_rank(batch: dict[str, torch.Tensor], mesh: Mesh, layout: str, device) -> dict[str, torch.Tensor]:
    """This CP rank's slice of each `[b, s]` tensor of a batch, on `device`; a packed batch's `cu_seqlens` (the
    document boundaries of the whole batch, the same on every rank) stays whole and on the host."""
    return {k: v if k == "cu_seqlens" else shard_sequence(v, mesh.cp_group, dim=1, layout=layout).to(device)
            for k, v in batch.items()}


def evaluate(engine, dataset, cfg: Config, mesh: Mesh, plan: Plan, device) -> dict[str, float]:
    """Held-out loss and accuracy on the loss-masked tokens (MQAR/passkey: the queried tokens)."""
    tc, seq = cfg.train, cfg.data.seq_len
    pos = position_ids(seq, mesh.cp_group, cfg.parallel.cp_layout, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # the all-reduce below takes no CPU tensor on NCCL
    engine.eval()
    with torch.no_grad():
        for k in range(tc.eval_batches):
            for m in range(plan.grad_accum):
                idx = micro_batch_indices(k * tc.global_batch_size, tc.micro_batch_size, plan.dp, mesh.dp_rank, m)
                b = _batch_to_rank(collate(dataset, idx), mesh, cfg.parallel.cp_layout, device)
                out = engine(b["input_ids"], pos, b["labels"], loss_mask=b["loss_mask"], return_predictions=True,
                             cu_seqlens=b.get("cu_seqlens"))
                hit = ((out.predictions == b["labels"]).float() * b["loss_mask"]).sum()
                totals += torch.stack([out.loss_sum.detach().double(), hit.double(), b["loss_mask"].sum().double()])
    engine.train()
    loss_sum, hits, count = comm.all_reduce(totals, group=mesh.dp_cp_group).tolist()  # one host read
    n = max(count, 1.0)
    return {"eval_loss": loss_sum / n, "eval_acc": hits / n}


def _save(ckpt: Checkpointer, engine, mesh: Mesh, cfg: Config, plan: Plan, step: int, position: int) -> Path:
    state = sharded_state(engine, mesh, step)
    state.update(_rng_names(mesh.rank))
    meta = {"position": position, "layout": {"world": plan.world, "tp": plan.tp, "cp": plan.cp, "dp": plan.dp},
            "zero_stage": cfg.train.zero_stage, "config": to_dict(cfg),
            "schedule": {"next_lr": lr_at(step, cfg.train.lr, cfg.train.min_lr, cfg.train.warmup, cfg.train.steps),
                         "steps": cfg.train.steps, "warmup": cfg.train.warmup}}
    with heartbeat.phase("save"):
        return ckpt.save(step, state, meta)


def _model_dict(model_cfg) -> dict:
    """The model config as compared on resume (activation checkpointing changes memory, not the model). A key
    the checkpoint's config predates takes its default, so adding a config field does not orphan old runs."""
    d = to_dict(ModelConfig()) | (dict(model_cfg) if isinstance(model_cfg, dict) else to_dict(model_cfg))
    d.pop("activation_checkpointing", None)
    return d


class _Preemption:
    """A preemption notice (SIGTERM/SIGUSR1, or the launcher; lctrain.checkpoint.preempt) -> a flag the ranks agree
    on at step ends; a watchdog bounds the time from the notice to the exit by the grace period.

    The handler is installed here when the loop runs in the main thread; elsewhere (a Ray actor method thread) the
    process's main thread installed it already (launch/worker.py), and the flag is process-wide either way.
    """

    def __init__(self, grace_s: float, device: torch.device | None = None):
        self.grace_s, self.signalled = notices.effective_grace(grace_s), False
        if self.grace_s < grace_s:
            warnings.warn(f"train.preempt_grace_s = {grace_s:g} s, but torchrun kills its workers "
                          f"{notices.TORCHRUN_KILL_S:g} s after its own SIGTERM: the watchdog uses {self.grace_s:g} s "
                          "(a step plus a save must fit in it)", stacklevel=2)
        self.device = device if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self.active = grace_s > 0
        self._had_handler = notices.installed()
        self._remove = None
        if self.active:
            notices.install()
            notices.arm()
            self._remove = notices.add_listener(self._on_notice)

    def _on_notice(self, reason: str) -> None:
        self.signalled = True
        print(f"{reason}: saving a checkpoint after this step, then exiting (grace {self.grace_s:g} s)", flush=True)
        timer = threading.Timer(self.grace_s, self._overdue)
        timer.daemon = True
        timer.start()

    def _overdue(self) -> None:
        print(f"preemption: no checkpoint within train.preempt_grace_s = {self.grace_s:g} s; exiting without one",
              flush=True)
        os._exit(1)

    def agreed(self, group=None) -> bool:
        """Whether any rank got a notice: a MAX all-reduce of a 4-byte flag on the training device over `group`."""
        if not self.active:
            return False
        flag = torch.tensor([int(notices.requested())], dtype=torch.int32, device=self.device)
        if comm.is_distributed():
            flag = comm.all_reduce(flag, group=group, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Stop acting on notices; a notice this run acted on is consumed (a later run in the process starts clean)."""
        if self.active:
            self._remove()
            notices.disarm()
            if self.signalled:
                notices.clear()
            if not self._had_handler:
                notices.uninstall()
            self.active = False


def build_run_engine(cfg: Config, mesh: Mesh, plan: Plan, device, builder=build_engine):
    """The model (lctrain's `build_model` on the mesh) inside its engine; `builder` is `build_engine`
    (DeepSpeed) in a run, a stand-in with the same interface in `lctrain.rehearse`. Returns (model, engine)."""
    return builder(lambda: build_model(cfg.model, mesh, cfg.parallel.cp_layout), cfg.train, mesh, plan.grad_accum,
                   device)


def step_batches(dataset, cfg: Config, mesh: Mesh, plan: Plan, position: int, device) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the step that starts at global sample `position`, its CP slices on `device`."""
    tc = cfg.train
    return [_batch_to_rank(collate(dataset, micro_batch_indices(position, tc.micro_batch_size, plan.dp, mesh.dp_rank,
                                                                m)), mesh, cfg.parallel.cp_layout, device)
            for m in range(plan.grad_accum)]


def train_step(engine, micro: list[dict[str, torch.Tensor]], pos: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Forward, backward and optimizer step over one step's micro-batches.

    Returns:
        The step's global token-mean loss as a float64 scalar on the device (summed over the micro-batches in
        order, as a Python float would); nothing here reads the device, the caller reads it when it logs.
    """
    # The step's token count on this rank; global_token_mean sums it over DP x CP.
    step_tokens = sum(b["loss_mask"].sum() for b in micro).to(torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=pos.device)
    for b in micro:
        out = engine(b["input_ids"], pos, b["labels"], loss_mask=b["loss_mask"], cu_seqlens=b.get("cu_seqlens"))
        loss = global_token_mean(out.loss_sum, step_tokens, mesh.dp_cp_group)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        total += loss.detach().double()
    return total


def read_losses(pending: dict[int, torch.Tensor]) -> dict[int, float]:
    """The device losses of the `pending` steps as floats, in one host read (`pending` is emptied)."""
    if not pending:
        return {}
    steps = list(pending)
    values = torch.stack([pending.pop(s) for s in steps]).tolist()
    return dict(zip(steps, values))


def run(cfg: Config, resume: str = "auto") -> TrainResult:
    """Train per `cfg`, resuming per `resume` ("auto" | "none" | checkpoint path); see the module docstring.

    Raises:
        ValueError: a bad config or layout (before any communication), or a missing/corrupt checkpoint
            (CheckpointError, naming the path).
    """
    world = _world_size()
    plan = plan_run(cfg, world)
    run_dir = Path(cfg.run.out_dir)
    ckpt_root = run_dir / "checkpoints"
    # A missing explicit checkpoint is the user's mistake: say so before any communication.
    if resume not in ("auto", "none"):
        read_meta(resume, verify=False)
    heartbeat.beat(0, "init")

    mesh = init_mesh(cfg.parallel)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    resume_path, skipped = choose_checkpoint(resume, ckpt_root, device)
    meta = read_meta(resume_path, verify=False) if resume_path is not None else None
    if meta is not None and _model_dict(meta["config"]["model"]) != _model_dict(cfg.model):
        raise CheckpointError(f"checkpoint {str(resume_path)!r} was saved for a different model config "
                              f"({meta['config']['model']} vs {to_dict(cfg.model)})")
    if mesh.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(cfg.train.seed)
    model, engine = build_run_engine(cfg, mesh, plan, device)
    step, position = 0, 0
    if resume_path is not None:
        with heartbeat.phase("load"):
            step, position = int(meta["step"]), int(meta["position"])
            prepare_load(engine, step)
            load_state(resume_path, sharded_state(engine, mesh, step, for_load=True))
            finish_load(engine)
            _restore_rng(resume_path, meta, mesh.rank, world)
    elif cfg.checkpoint.init_from:
        from lctrain.checkpoint.export import load_export_into

        with heartbeat.phase("load"):
            load_export_into(engine, mesh, cfg.checkpoint.init_from)

    tc, seq, layout = cfg.train, cfg.data.seq_len, cfg.parallel.cp_layout
    end = tc.steps if tc.exit_after == 0 else min(tc.steps, step + tc.exit_after)
    train_data, eval_data = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "eval")
    pos = position_ids(seq, mesh.cp_group, layout, device=device)
    logger = MetricsLogger(run_dir, mesh.rank, step, tc.steps, tc.progress)
    if skipped:
        lines = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        used = str(resume_path) if resume_path is not None else "none (fresh start)"
        msg = f"skipped {len(skipped)} damaged checkpoint(s) newer than the one used ({used}): {lines}"
        warnings.warn(msg, stacklevel=2)
        logger.write(f"WARNING: {msg}")
        logger.log({"event": "resume_fallback", "step": step, "used": used,
                    "skipped": [{"checkpoint": str(p), "reason": why} for p, why in skipped]})
    if resume_path is not None:
        logger.write(f"resumed from {resume_path} at step {step} (sample {position})")
    ckpt = Checkpointer(ckpt_root, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    ckpt.continue_from(resume_path)
    preempt = _Preemption(tc.preempt_grace_s)
    flops = getattr(engine.module, "flops_per_token", None)
    peak = peak_flops()
    result = TrainResult(final_step=step, run_dir=str(run_dir), resumed_from=str(resume_path) if resume_path else None,
                         position=position)
    run_tokens, run_time = 0, 0.0
    pending: dict[int, torch.Tensor] = {}  # step -> its loss on the device, read at the next log point
    if step >= end:
        logger.write(f"nothing to train: the checkpoint is at step {step} of {tc.steps} "
                     f"(use --resume none or another run.out_dir to start over)")
        with heartbeat.phase("eval"):
            result.evals[step] = evaluate(engine, eval_data, cfg, mesh, plan, device)

    while step < end:
        heartbeat.beat(step, None)
        t0 = time.perf_counter()
        lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup, tc.steps)
        set_lr(engine, lr)
        micro = step_batches(train_data, cfg, mesh, plan, position, device)
        pending[step + 1] = train_step(engine, micro, pos, mesh)
        step += 1
        position += tc.global_batch_size
        dt = time.perf_counter() - t0
        tokens = tc.global_batch_size * seq
        run_tokens, run_time = run_tokens + tokens, run_time + dt
        at_eval = bool(tc.eval_every and step % tc.eval_every == 0) or step == end
        # train.exit_after always ends with a checkpoint (the next run continues from it).
        at_end = step == end and (cfg.checkpoint.at_end or end < tc.steps)
        at_save = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or at_end
        # The host reads the device only at log points (and evals and saves, which wait anyway): the losses since
        # the last one, and the ranks' preemption agreement. Other steps issue no host sync.
        if not (step % tc.log_every == 0 or at_eval or at_save):
            continue
        result.losses.update(read_losses(pending))
        preempted = preempt.agreed()
        grad_norm = engine.get_global_grad_norm()
        record = {"step": step, "loss": result.losses[step], "tokens": step * tokens, "tokens_per_s": tokens / dt,
                  "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None, "step_time_s": dt}
        if flops is not None and peak is not None:
            record["mfu"] = flops(seq) * tokens / dt / (peak * world)
        if at_eval and not preempted:
            with heartbeat.phase("eval"):
                ev = evaluate(engine, eval_data, cfg, mesh, plan, device)
            result.evals[step] = ev
            record.update(ev)
        if step % tc.log_every == 0 or step == end or "eval_acc" in record:
            logger.log(record)
        if at_save or preempted:
            t_save = time.perf_counter()
            result.checkpoint = str(_save(ckpt, engine, mesh, cfg, plan, step, position))
            result.save_s.append(time.perf_counter() - t_save)
            logger.write(f"checkpoint: {result.checkpoint}" + (" (writing in the background)"
                                                               if cfg.checkpoint.async_save else ""))
        if preempted:
            result.preempted = True
            logger.write(f"preempted (SIGTERM): stopped after step {step} with a checkpoint")
            break

    result.losses.update(read_losses(pending))
    with heartbeat.phase("save"):
        ckpt.close()
    preempt.close()
    result.final_step, result.position = step, position
    result.tokens_per_s = run_tokens / run_time if run_time else 0.0
    if result.evals:
        last = result.evals[max(result.evals)]
        logger.write(f"step {step}/{tc.steps}: eval loss {last['eval_loss']:.4f}, "
                     f"held-out accuracy on scored tokens (MQAR: recalled values) {last['eval_acc']:.4f}")
    logger.close()
    if mesh.rank == 0 and tc.plot and (run_dir / "metrics.jsonl").is_file():
        from lctrain.train.plot import plot_run

        print(f"plot: {plot_run(run_dir)}", flush=True)
    return result
