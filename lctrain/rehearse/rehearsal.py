"""`rehearse(cfg, gpus=N)`: the real `lctrain train` code path as one rank of an N-GPU job, on meta tensors over a
`meta:fake` process group; see lctrain/rehearse/__init__.py and docs/rehearse.md."""
from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lctrain.config import Config
from lctrain.parallel import comm
from lctrain.rehearse.report import CollectiveReport, LayerReport, Report
from lctrain.rehearse.standin import StandInEngine, StandInText, standin_builder
from lctrain.rehearse.watch import DeviceDtypeWatcher, Finding, MemoryWatcher, Phase
from lctrain.rehearse.world import fake_world
from lctrain.testing.hot_path import (CollectiveOnHostTensor, SyncingOp, source_line, watch_collectives,
                                     watch_syncing_ops)

HARDWARE = ("h100", "h200", "a100-80g")
META = torch.device("meta")


class RehearsalError(RuntimeError):
    """The rehearsal could not go on (the first failure of a class that stops the code, e.g. a CPU collective)."""


def busiest_rank(cfg: Config, gpus: int) -> int:
    """The global rank with the most work: TP rank 0, DP rank 0, and under the contiguous layout the last CP rank
    (its queries see every block); under zigzag every CP rank does the same work, so rank 0 (which also scans the
    checkpoints for the resume decision)."""
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    cp_rank = cp - 1 if cfg.parallel.cp_layout == "contiguous" else 0
    return tp * cp_rank  # Megatron's order tp-cp-dp: rank = tp_rank + tp * (cp_rank + cp * dp_rank)


def _dataset(cfg: Config, split: str, notes: list[str], stand_ins: list[str]):
    from lctrain.data.sampler import build_dataset
    from lctrain.data.text import INDEX

    if cfg.data.source != "text" or (Path(cfg.data.path) / INDEX).is_file():
        return build_dataset(cfg.data, split)
    if split == "train":
        stand_ins.append(f"data: {cfg.data.path!r} is not prepared here; samples of seq_len {cfg.data.seq_len} with "
                         + ("document lengths log-normal (median 1024, sigma 1.0, >= 16 tokens)"
                            if cfg.data.document_mask and cfg.data.packing != "pad" else "no documents"))
    return StandInText(cfg.data.seq_len, cfg.data.document_mask and cfg.data.packing != "pad", cfg.data.seed)


def _unprepared_ok(cfg: Config) -> Config:
    """`cfg` for `plan_run` when its text corpus is not prepared here (it lives on the cluster's storage): the token
    ids are then bounded by the tokenizer's vocabulary, as for a corpus prepared from `data.inputs` at start-up."""
    from dataclasses import replace

    from lctrain.data.text import INDEX

    if cfg.data.source != "text" or (Path(cfg.data.path) / INDEX).is_file() or cfg.data.inputs:
        return cfg
    return replace(cfg, data=replace(cfg.data, inputs=["<prepared on the cluster>"]))


def _group_names(mesh) -> dict[int, str]:
    names = {id(None): "world", id(dist.group.WORLD): "world"}
    for name in ("tp", "cp", "dp", "dp_cp"):
        g = getattr(mesh, f"{name}_group")
        if g is not None and id(g) not in names:
            names[id(g)] = name
    return names


def _collectives(calls, names) -> list[CollectiveReport]:
    agg: dict[tuple[str, str], CollectiveReport] = {}
    for c in calls:
        group = names.get(id(c.group), "other")
        if c.group is not None and comm.group_size(c.group) < 2:
            continue
        r = agg.setdefault((c.name, group), CollectiveReport(c.name, group, 0, 0))
        r.bytes += c.bytes
        r.calls += 1
    return sorted(agg.values(), key=lambda r: (r.group, r.op))


class _Layers:
    """Per-layer saved bytes (the activation bytes a layer's forward leaves alive, its output excluded) and the
    backends its calls dispatched to, measured in the first step's forward."""

    def __init__(self, model, mem: MemoryWatcher):
        from lctrain.ops import attention, gated_delta, gla, linear_attention

        self.registries = [attention.REGISTRY, linear_attention.REGISTRY, gated_delta.REGISTRY, gla.REGISTRY]
        self.mem, self.active = mem, False
        self.layers = [LayerReport(i, getattr(model.cfg, "mixers", "?")[i], getattr(layer.mixer, "method", "?"), 0)
                       for i, layer in enumerate(model.layers)]
        self._open: dict[int, tuple] = {}
        self.hooks = []
        for i, layer in enumerate(model.layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._pre(i)))
            self.hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: self._post(i, o)))

    def _pre(self, i: int) -> None:
        if not self.active or not torch.is_grad_enabled():
            return
        stack = contextlib.ExitStack()
        names = [stack.enter_context(r.track()) for r in self.registries]
        self._open[i] = (stack, names, self.mem.live_bytes("activation"))

    def _post(self, i: int, out) -> None:
        if i not in self._open:
            return
        stack, names, before = self._open.pop(i)
        stack.close()
        out_bytes = out.untyped_storage().nbytes() if isinstance(out, torch.Tensor) else 0
        self.layers[i].saved_bytes = max(0, self.mem.live_bytes("activation") - before - out_bytes)
        self.layers[i].backends = sorted({n for ns in names for n in ns})

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def rehearse(cfg: Config, gpus: int, gpus_per_node: int | None = None, rank: int | None = None, steps: int = 3,
             hardware: str = "h100", resume: str = "auto", config_name: str = "") -> Report:
    """Run the training code path of `cfg` as rank `rank` (default: `busiest_rank`) of a `gpus`-GPU job on meta
    tensors; see the package docstring. Raises ValueError for a config or layout that `lctrain train` refuses;
    every failure of the run itself is a finding in the report (`report.ok` is False)."""
    from lctrain.preflight import Target, require_preflight
    from lctrain.train import trainer
    from lctrain.train.engine import resolve_dtype, set_lr
    from lctrain.train.schedule import lr_at

    if hardware not in HARDWARE:
        raise ValueError(f"--hardware must be one of {HARDWARE}, got {hardware!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step is warm-up; the steady state starts at the second), "
                         f"got {steps}")
    t0 = time.perf_counter()
    gpus_per_node = gpus_per_node or min(gpus, 8)
    require_preflight(cfg, Target.of(gpus, gpus_per_node, multi_node=gpus > gpus_per_node))
    plan = trainer.plan_run(_unprepared_ok(cfg), gpus)
    rank = busiest_rank(cfg, gpus) if rank is None else rank
    # The job runs on GPUs: train.dtype "auto" is bf16 there.
    dtype = torch.bfloat16 if cfg.train.dtype == "auto" else resolve_dtype(cfg.train)
    tc = cfg.train
    phase = Phase()
    findings: list[Finding] = []
    allowed: list[dict[str, str]] = []
    notes: list[str] = []
    stand_ins = [f"DeepSpeed's engine: StandInEngine (ZeRO-{tc.zero_stage} collectives through lctrain.parallel.comm "
                 "and its parameter/gradient/optimizer bytes; lctrain/rehearse/standin.py)",
                 "checkpoint save: its collectives only (barriers, DCP's planning object collectives); nothing written"]
    mem = MemoryWatcher()

    def on_sync(seen: SyncingOp) -> None:
        steady = phase.name == "step" and phase.step >= 2
        detail = seen.why
        if "site-packages" in seen.line or seen.line.startswith(("megatron/", "deepspeed/")):
            detail += f" (called from {source_line(skip=('/site-packages/',))})"
        rec = {"kind": "host_sync", "op": seen.op, "line": seen.line, "detail": detail, "phase": phase.label()}
        (findings.append(Finding(**rec)) if steady else allowed.append(rec))

    def adopt_params(model) -> None:
        for p in model.parameters():
            if tc.zero_stage < 3:
                mem.adopt(p, "param")
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: mem.adopt(p.grad, "grad"))

    with fake_world(gpus, rank, cfg.parallel) as mesh:
        names = _group_names(mesh)
        devdt = DeviceDtypeWatcher(phase, dtype)
        with watch_collectives() as coll, watch_syncing_ops(on_sync=on_sync), mem, devdt:
            marks: dict[str, tuple[int, int]] = {}

            @contextlib.contextmanager
            def phase_of(name: str, step: int = 0):
                phase.name, phase.step = name, step
                start = len(coll.calls)
                yield
                marks[phase.label()] = (start, len(coll.calls))

            engine = None
            try:
                with phase_of("setup"):
                    ckpt_root = Path(cfg.run.out_dir) / "checkpoints"
                    resume_path, _ = trainer.choose_checkpoint(resume, ckpt_root, META)
                    if resume_path is not None:
                        notes.append(f"rank 0 would resume from {resume_path}; loading was not rehearsed")
                    model, engine = trainer.build_run_engine(
                        cfg, mesh, plan, META, builder=standin_builder(dtype, mem.adopt, adopt_params, mem.paused))
                    layers = _Layers(model, mem)
                    train_data = _dataset(cfg, "train", notes, stand_ins)
                    eval_data = _dataset(cfg, "eval", notes, stand_ins)
                    pos = trainer.position_ids(cfg.data.seq_len, mesh.cp_group, cfg.parallel.cp_layout, device=META)
                    preempt_kwargs = {"device": META} if "device" in inspect.signature(
                        trainer._Preemption).parameters else {}
                    preempt = trainer._Preemption(tc.preempt_grace_s, **preempt_kwargs)
                position = 0
                for k in range(1, steps + 1):
                    with phase_of("step", k):
                        layers.active = k == 1
                        set_lr(engine, lr_at(k - 1, tc.lr, tc.min_lr, tc.warmup, tc.steps))
                        micro = trainer.step_batches(train_data, cfg, mesh, plan, position, META)
                        loss = trainer.train_step(engine, micro, pos, mesh)
                        position += tc.global_batch_size
                    with phase_of("log"):
                        trainer.read_losses({k: loss})
                        preempt.agreed()
                        engine.get_global_grad_norm()
                layers.active = False
                with phase_of("eval"):
                    trainer.evaluate(engine, eval_data, cfg, mesh, plan, META)
                with phase_of("save"):
                    _save_collectives(cfg)
                preempt.close()
            except CollectiveOnHostTensor as err:
                findings.append(Finding("cpu_collective", str(err).split(" ", 1)[0], err.line, str(err), phase.label()))
            except Exception as err:  # noqa: BLE001 - any failure of the rehearsed code is a finding with its line
                findings.append(Finding("error", type(err).__name__, _raising_line(err), str(err)[:500],
                                        phase.label()))
            finally:
                if isinstance(engine, StandInEngine):
                    engine.close()
        findings.extend(f for f in devdt.findings if f.phase.startswith("step") or f.phase in ("eval", "log"))
        per_step = _collectives(coll.calls[slice(*marks[f"step {steps}"])], names) if f"step {steps}" in marks else []
        by_phase = {p: _collectives(coll.calls[slice(*m)], names) for p, m in marks.items()
                    if not p.startswith("step")}
        h2d = dict(devdt.h2d)
        notes.extend(devdt.by_design_notes())
    params = sum(e[0] for e in mem.live.values() if e[1] == "param")
    opt = sum(e[0] for e in mem.live.values() if e[1] == "optimizer")
    grads = _grad_bytes(engine, dtype) if engine is not None else 0
    report = Report(
        config=config_name, gpus=gpus, gpus_per_node=gpus_per_node, rank=rank,
        layout={"tp": plan.tp, "cp": plan.cp, "dp": plan.dp, "grad_accum": plan.grad_accum,
                "zero_stage": tc.zero_stage},
        hardware=hardware, dtype=str(dtype).replace("torch.", ""), steps=steps,
        peak_bytes=mem.peak, states_bytes=params + grads + opt,
        activations_bytes=mem.category_peak["activation"], comm_buffer_bytes=mem.category_peak["comm"],
        layers=layers.layers if engine is not None else [], largest_allocations=mem.largest(10),
        collectives_per_step=per_step, collectives_by_phase=by_phase, stand_ins=stand_ins,
        findings=[_asdict(f) for f in _dedup(findings)],
        notes=notes, host_to_device=h2d, syncs_allowed=allowed, seconds=time.perf_counter() - t0)
    from lctrain.plan.hardware import HARDWARE as DEVICES

    report.device_usable_bytes = int(DEVICES[hardware].usable_bytes)
    report.fits = report.peak_bytes <= report.device_usable_bytes
    return report


def _raising_line(err: BaseException) -> str:
    """`file:line` of the innermost frame of `err`'s traceback that is lctrain's, a test's or a library's own
    (not torch, not the rehearsal)."""
    import traceback

    from lctrain.testing.hot_path import _PLUMBING, _short_path

    line = "?"
    for frame in traceback.extract_tb(err.__traceback__):
        name = frame.filename.replace("\\", "/")
        if not any(p in name for p in _PLUMBING):
            line = f"{_short_path(name)}:{frame.lineno}"
    return line


def _asdict(f: Finding) -> dict[str, str]:
    return {"kind": f.kind, "op": f.op, "line": f.line, "detail": f.detail, "phase": f.phase}


def _dedup(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, line), the first seen."""
    seen, out = set(), []
    for f in findings:
        if (f.kind, f.line) not in seen:
            seen.add((f.kind, f.line))
            out.append(f)
    return out


def _grad_bytes(engine: StandInEngine, dtype: torch.dtype) -> int:
    """Gradient bytes the rank holds: autograd's full gradients in the train dtype (ZeRO 0/1), or the fp32 partition
    (ZeRO 2/3, whose full gradients are reduced bucket by bucket as they appear)."""
    if engine.stage >= 2:
        return engine.states["grad_partition"].untyped_storage().nbytes()
    return engine.numel * torch.empty(0, dtype=dtype).element_size()


def _save_collectives(cfg: Config) -> None:
    """The collectives `Checkpointer.save` issues around DCP (lctrain/checkpoint/store.py): a barrier before the
    write; DCP's planning (gather the plans to the coordinator, scatter the final plans, gather the write results:
    object collectives); then, for a synchronous save, the barriers around the rename."""
    barrier()
    for _ in range(2):
        comm.all_gather_object(None)
    if not cfg.checkpoint.async_save:
        barrier()
        barrier()


def barrier() -> None:
    """`comm.barrier()` as NCCL runs it: a one-element all-reduce on the current device (torch's fake backend
    would build its barrier tensor on the CPU, which is the fake world's artefact, not the job's)."""
    comm.all_reduce(torch.zeros(1, device=META))
