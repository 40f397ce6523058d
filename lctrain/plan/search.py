"""Plan rows: one simulated rank per distinct (tp, cp, layout, SP methods, activation checkpointing), every DP /
ZeRO variant derived from it by the time model, and the search over all valid layouts.

Why one simulation serves every ZeRO stage and DP size: a rank's forward + backward does not depend on either
(ZeRO acts on the optimizer state and the gradient reduction after backward; DP only on which samples a rank
reads), so they enter through timemodel.py alone.

Search order and pruning (both exact, never dropping a layout that could fit):
- (tp, cp): tp divides the GPUs per node (TP stays on NVLink, as `lctrain.preflight` requires) and the model's
  heads / kv heads / FFN / vocabulary; cp divides GPUs / tp; the sequence splits into 2*cp chunks (zigzag) or cp
  (contiguous, LASP-1's layout).
- A layout whose lower bound on memory (ZeRO-3 states + the block inputs every checkpointing mode keeps,
  `L x b x s/cp x hidden x 2` bytes) exceeds the device is reported as OOM without simulation.
- Checkpointing "full" (least activation memory) is simulated first; when it does not fit at any ZeRO stage,
  "selective" and "none" (which keep a superset of its tensors) cannot fit either and are not simulated.

Simulations are cached on disk (`LCTRAIN_PLAN_CACHE`, default ~/.cache/lctrain/plan), keyed by the spec and
a hash of lctrain's source, so a repeated plan costs only the time model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from lctrain.models.config import LINEAR_SP, SOFTMAX_SP, WINDOW_SP, ModelConfig
from lctrain.plan.hardware import Hardware
from lctrain.plan.simulate import (ACTIVATION_CHECKPOINTING, CommStat, RankSim, SimSpec,
                                   simulate_composed, spec_key)
from lctrain.plan.timemodel import ZERO_STAGES, Job, StepEstimate, estimate_step, zero_state_bytes


@dataclass
class PlanRow:
    """One layout's prediction (the --json row)."""

    tp: int
    cp: int
    dp: int
    cp_layout: str
    softmax_sp: str
    linear_sp: str
    zero_stage: int
    activation_checkpointing: str
    mem_gb: float
    oom: bool
    step_s: float
    tokens_per_s: float
    mfu: float
    comm_frac: float
    states_gb: float = 0.0
    activations_gb: float = 0.0
    compute_s: float = 0.0
    comm_exposed_s: float = 0.0
    comm_total_s: float = 0.0
    simulated: bool = True
    """False: the lower bound alone showed OOM (memory is that bound; times are not computed)."""
    margin_gb: float = 0.0
    """OOM margin included in mem_gb: fragmentation x activations + the device's reserve."""
    accumulation: int = 1
    """Micro-batches per optimizer step on each DP rank."""
    memory_bound_s: float = 0.0
    optimizer_s: float = 0.0
    compute_by_class_s: dict = field(default_factory=dict)
    """Step compute by op class: matmul, attention, linear_attention, memory (memory-bound)."""
    compute_by_mixer_s: dict = field(default_factory=dict)
    """Step compute by scope: A, L, D, G (each mixer type's layers), MLP, embed/loss."""
    comm_exposed_by_kind_s: dict = field(default_factory=dict)
    comm_total_by_kind_s: dict = field(default_factory=dict)
    memory_bound_bytes: dict = field(default_factory=dict)
    """Memory-bound bytes of one micro-batch by op class (elementwise, reduction, copy, fill)."""
    flops_by_class_dtype: dict = field(default_factory=dict)
    window_sp: str | None = None
    """The SP method of the sliding-window ("W") layers, None for a model without them."""
    """FLOPs of one micro-batch by "class|dtype"."""

    def to_dict(self) -> dict:
        return asdict(self)


def check_plan_inputs(cfg: ModelConfig, gpus: int, gpus_per_node: int, seq: int, tp: int | None = None,
                      cp: int | None = None, cp_layout: str = "zigzag") -> None:
    """Clear ValueErrors for a request that cannot describe a job."""
    for name, v in (("--gpus", gpus), ("--gpus-per-node", gpus_per_node), ("--seq", seq)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if tp is not None and cp is not None:
        if gpus % (tp * cp):
            raise ValueError(f"{gpus} GPUs are not divisible by tp*cp = {tp}*{cp} = {tp * cp}")
        parts = 2 * cp if cp_layout == "zigzag" else cp
        if seq % parts:
            raise ValueError(f"sequence length {seq} is not divisible by "
                             f"{'2*CP' if cp_layout == 'zigzag' else 'CP'} = {parts} (CP={cp}, layout {cp_layout})")
        cfg.validate_parallel(tp, cp, cp_layout)


def source_hash() -> str:
    """Hash of lctrain's Python sources (a cached simulation is stale when the code changed)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class SimCache:
    """Simulations by spec: in memory, and on disk unless `path` is None."""

    def __init__(self, path: str | Path | None = "default"):
        if path == "default":
            path = os.environ.get("LCTRAIN_PLAN_CACHE", str(Path.home() / ".cache" / "lctrain" / "plan"))
        self.path = Path(path) if path else None
        self.memory: dict[str, RankSim] = {}
        self._src = source_hash() if self.path else ""

    def _file(self, key: str) -> Path:
        return self.path / (hashlib.sha256((self._src + key).encode()).hexdigest()[:24] + ".json")

    def get(self, key: str, spec: SimSpec) -> RankSim | None:
        if key in self.memory:
            return self.memory[key]
        if self.path is not None and self._file(key).is_file():
            d = json.loads(self._file(key).read_text())
            sim = RankSim(spec=spec, world=d["world"], params_local=d["params_local"],
                          params_tp_replicated=d["params_tp_replicated"], param_bytes=d["param_bytes"],
                          activation_peak_bytes=d["activation_peak_bytes"],
                          activation_after_forward_bytes=d["activation_after_forward_bytes"], flops=d["flops"],
                          memory_bound_bytes=d["memory_bound_bytes"], comm=[CommStat(**c) for c in d["comm"]],
                          sim_seconds=0.0, ops=d.get("ops", 0), flops_detail=d.get("flops_detail", {}),
                          bytes_detail=d.get("bytes_detail", {}))
            self.memory[key] = sim
            return sim
        return None

    def put(self, key: str, sim: RankSim) -> None:
        self.memory[key] = sim
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            d = sim.to_dict()
            d.update(params_tp_replicated=sim.params_tp_replicated, ops=sim.ops)
            self._file(key).write_text(json.dumps(d))

    # the dict interface simulate_composed uses for its short simulations
    def __contains__(self, key: str) -> bool:
        return key in self.memory or (self.path is not None and self._file(key).is_file())

    def __getitem__(self, key: str) -> RankSim:
        spec = SimSpec(**{**json.loads(key), "model": ModelConfig(**json.loads(key)["model"])})
        sim = self.get(key, spec)
        if sim is None:
            raise KeyError(key)
        return sim

    def __setitem__(self, key: str, sim: RankSim) -> None:
        self.put(key, sim)


def simulate(spec: SimSpec, cache: SimCache | None = None) -> RankSim:
    """The composed simulation of `spec` (see simulate.simulate_composed), through `cache`."""
    cache = cache if cache is not None else SimCache(None)
    key = "composed:" + spec_key(spec)
    hit = cache.memory.get(key)
    if hit is not None:
        return hit
    sim = simulate_composed(spec, cache)
    cache.memory[key] = sim
    return sim


def make_row(sim: RankSim, est: StepEstimate, dp: int, zero: int) -> PlanRow:
    s = sim.spec
    by_cd: dict[str, float] = {}
    for key, v in sim.flops_detail.items():
        _, cls, dtype = key.split("|")
        by_cd[f"{cls}|{dtype}"] = by_cd.get(f"{cls}|{dtype}", 0.0) + v
    return PlanRow(tp=s.tp, cp=s.cp, dp=dp, cp_layout=s.cp_layout, softmax_sp=s.model.softmax_sp,
                   linear_sp=s.model.linear_sp, zero_stage=zero, activation_checkpointing=s.activation_checkpointing,
                   mem_gb=est.mem_total_bytes / 1e9, oom=est.oom, step_s=est.step_s, tokens_per_s=est.tokens_per_s,
                   mfu=est.mfu, comm_frac=est.comm_frac, states_gb=est.mem_states_bytes / 1e9,
                   activations_gb=est.mem_activation_bytes / 1e9, compute_s=est.compute_s,
                   comm_exposed_s=est.comm_exposed_s, comm_total_s=est.comm_total_s,
                   margin_gb=est.mem_margin_bytes / 1e9, accumulation=est.accumulation,
                   memory_bound_s=est.memory_bound_s, optimizer_s=est.optimizer_s,
                   compute_by_class_s=dict(est.compute_by_class_s), compute_by_mixer_s=dict(est.compute_by_scope_s),
                   comm_exposed_by_kind_s=dict(est.comm_exposed_by_kind_s),
                   comm_total_by_kind_s=dict(est.comm_total_by_kind_s), memory_bound_bytes=sim.bytes_by("class"),
                   flops_by_class_dtype=by_cd, window_sp=s.model.window_sp if "W" in s.model.mixers else None)


def plan_rows(spec: SimSpec, gpus: int, gpus_per_node: int, hw: Hardware, zero_stages: Iterable[int] = ZERO_STAGES,
              cache: SimCache | None = None, job: Job | None = None) -> tuple[RankSim, list[PlanRow]]:
    """Simulate `spec` once and predict every requested ZeRO stage at DP = gpus / (tp cp)."""
    dp = gpus // (spec.tp * spec.cp)
    sim = simulate(spec, cache)
    rows = [make_row(sim, estimate_step(sim, hw, dp, z, gpus_per_node, job), dp, z) for z in zero_stages]
    return sim, rows


def candidate_layouts(cfg: ModelConfig, gpus: int, gpus_per_node: int, seq: int,
                      tps: Iterable[int] | None = None, cps: Iterable[int] | None = None,
                      softmax_sps: Iterable[str] | None = None,
                      linear_sps: Iterable[str] | None = None,
                      window_sps: Iterable[str] | None = None) -> list[tuple[int, int, str, str, str, str]]:
    """Every valid (tp, cp, cp_layout, softmax_sp, linear_sp, window_sp) for the job (rules in the module
    docstring); each method axis is searched only when the model has layers of its kind."""
    mixers = set(cfg.mixers)
    ssps = list(softmax_sps or (SOFTMAX_SP if "A" in mixers else [cfg.softmax_sp]))
    lsps = list(linear_sps or (LINEAR_SP if mixers & set(LINEAR_MIXERS) else [cfg.linear_sp]))
    wsps = list(window_sps or (WINDOW_SP if "W" in mixers else [cfg.window_sp]))
    out = []
    for tp in (tps or [t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0]):
        if gpus % tp:
            continue
        for cp in (cps or [c for c in range(1, gpus // tp + 1) if (gpus // tp) % c == 0]):
            if gpus % (tp * cp):
                continue
            for lsp, layout in _layouts(lsps, mixers):
                parts = 2 * cp if layout == "zigzag" else cp
                if seq % parts:
                    continue
                for ssp in ssps:
                    for wsp in wsps:
                        model = replace(cfg, softmax_sp=ssp, linear_sp=lsp, window_sp=wsp)
                        try:
                            model.validate_parallel(tp, cp, layout)
                        except ValueError:
                            continue
                        out.append((tp, cp, layout, ssp, lsp, wsp))
    return out


#: Mixers whose SP method is `linear_sp` (linear attention, GatedDeltaNet, GLA).
LINEAR_MIXERS = ("L", "D", "G")


def _layouts(lsps: list[str], mixers: set[str]) -> list[tuple[str, str]]:
    """(linear_sp, cp_layout) pairs: LASP-1 needs contiguous; softmax layers want zigzag (causal balance); a
    pure linear model runs LASP-2 on either (contiguous: one state per rank instead of two)."""
    out = []
    for lsp in lsps:
        if mixers & set(LINEAR_MIXERS) and lsp == "lasp1":
            out.append((lsp, "contiguous"))
        elif not mixers & {"A", "W"}:
            out += [(lsp, "zigzag"), (lsp, "contiguous")]
        else:
            out.append((lsp, "zigzag"))
    return out


def memory_lower_bound(cfg: ModelConfig, tp: int, cp: int, dp: int, seq: int, micro_batch: int) -> float:
    """Bytes every configuration of this layout needs at least: ZeRO-3 states of a 1/tp share of the
    parameters and the bf16 block inputs that even full checkpointing keeps."""
    from lctrain.models.flops import num_parameters

    states = zero_state_bytes(num_parameters(cfg) // tp, 3, cp * dp)
    inputs = cfg.num_layers * micro_batch * (seq // cp) * cfg.hidden_size * 2
    return states + inputs


def search(cfg: ModelConfig, gpus: int, gpus_per_node: int, seq: int, hw: Hardware, micro_batch: int = 1,
           checkpointing: Iterable[str] = ACTIVATION_CHECKPOINTING, zero_stages: Iterable[int] = ZERO_STAGES,
           cache: SimCache | None = None, progress: Callable[[str], None] | None = None, job: Job | None = None,
           **layout_filters) -> list[PlanRow]:
    """Rows for every valid layout x checkpointing x ZeRO stage (pruned as the module docstring says),
    best first (fitting rows by tokens/s, then OOM rows by memory)."""
    check_plan_inputs(cfg, gpus, gpus_per_node, seq)
    cache = cache if cache is not None else SimCache()
    zero_stages = list(zero_stages)
    order = [a for a in ("full", "selective", "none") if a in set(checkpointing)]
    rows: list[PlanRow] = []
    job = job or Job()
    layouts = [lay for lay in candidate_layouts(cfg, gpus, gpus_per_node, seq, **layout_filters)
               if job.global_batch is None or job.global_batch % (micro_batch * gpus // (lay[0] * lay[1])) == 0]
    if not layouts:
        raise ValueError(f"no valid layout of {gpus} GPUs ({gpus_per_node} per node) for sequence length {seq}: "
                         "check that the sequence splits into 2*CP chunks and the model over TP")
    _search_layouts(layouts, cfg, gpus, gpus_per_node, seq, hw, micro_batch, order, zero_stages, cache,
                    progress, rows, job)
    return sort_rows(rows)


def _search_layouts(layouts, cfg, gpus, gpus_per_node, seq, hw, micro_batch, order, zero_stages, cache, progress,
                    rows, job) -> None:
    for i, (tp, cp, layout, ssp, lsp, wsp) in enumerate(layouts):
        dp = gpus // (tp * cp)
        model = replace(cfg, softmax_sp=ssp, linear_sp=lsp, window_sp=wsp)
        wsp = wsp if "W" in model.mixers else None
        bound = memory_lower_bound(model, tp, cp, dp, seq, micro_batch)
        if bound + hw.memory_reserve_gb * 1e9 > hw.memory_gb * 1e9:
            for ac in order:
                for z in zero_stages:
                    rows.append(PlanRow(tp, cp, dp, layout, ssp, lsp, z, ac, bound / 1e9, True, float("inf"), 0.0,
                                        0.0, 0.0, simulated=False, window_sp=wsp))
            continue
        fits_full, full_gb = True, bound / 1e9
        for ac in order:
            if ac != "full" and not fits_full:
                # Keeps a superset of what "full" keeps: at least full's smallest memory, which does not fit.
                for z in zero_stages:
                    rows.append(PlanRow(tp, cp, dp, layout, ssp, lsp, z, ac, full_gb, True, float("inf"), 0.0,
                                        0.0, 0.0, simulated=False, window_sp=wsp))
                continue
            if progress:
                window = f"window={wsp} " if wsp else ""
                progress(f"[{i + 1}/{len(layouts)}] tp={tp} cp={cp} {layout} softmax={ssp} linear={lsp} {window}"
                         f"checkpointing={ac}")
            spec = SimSpec(model, tp=tp, cp=cp, cp_layout=layout, seq_len=seq, micro_batch=micro_batch,
                           activation_checkpointing=ac)
            _, new = plan_rows(spec, gpus, gpus_per_node, hw, zero_stages, cache, job)
            rows += new
            if ac == "full":
                fits_full = any(not r.oom for r in new)
                full_gb = min(r.mem_gb for r in new)


def sort_rows(rows: list[PlanRow]) -> list[PlanRow]:
    """Fitting rows by tokens/s (ties: the lower ZeRO stage, then less memory), then OOM rows by memory."""
    return sorted(rows, key=lambda r: (r.oom, -r.tokens_per_s if not r.oom else r.mem_gb,
                                       r.zero_stage, r.mem_gb))


def recommend(rows: list[PlanRow]) -> PlanRow | None:
    """The fastest row that fits in memory (ties: less memory), or None when none fits."""
    fitting = [r for r in rows if not r.oom and r.simulated]
    return min(fitting, key=lambda r: (-r.tokens_per_s, r.zero_stage, r.mem_gb)) if fitting else None
