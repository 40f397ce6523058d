"""Step time and memory per GPU of a layout, from one simulated rank (simulate.py) and one device table.

Compute: FLOPs / (peak x efficiency) per op class (matmul, attention, linear_attention) plus the bytes of all
other ops / (HBM bandwidth x efficiency).

Communication: one call of a collective over n ranks with this rank's payload b (as lctrain.parallel.comm counts
it), over a link of bandwidth W (link rate x NCCL bus efficiency) and per-step latency a, ring algorithms:

    all_gather      (n-1) (a + b / W)                 each rank receives the n-1 other payloads
    reduce_scatter  (n-1) (a + b / (n W))             b is the full buffer, 1/n of it per step
    all_reduce      2 (n-1) (a + b / (n W))           reduce-scatter + all-gather
    all_to_all      (n-1) a + (n-1)/n b / W           pairwise exchange
    send            a + b / W

The link is NVLink when the group lies inside a node, InfiniBand otherwise. Ranks are numbered Megatron's way
(tp fastest, then cp, then dp) and placed node-major, so with G GPUs per node: the TP group is inside a node
iff G % tp == 0; the CP group iff G % (tp cp) == 0; the DP x CP group (gradients, ZeRO) iff tp cp dp <= G.

Overlap, per method, as the code runs (what is exposed on the critical path):
- ring: the send of the next K/V block overlaps the current block's attention; exposed = max(0, sends - the
  attention compute of the other CP-1 steps), forward and backward (backward sends K/V and dK/dV).
- LASP-2 (lctrain.sp.lasp2): the one all-gather is in flight while the intra-chunk part runs; exposed =
  max(0, all-gather - linear-attention compute of that phase).
- LASP-1: P-1 dependent hops of one state, nothing to hide behind: exposed = (CP-1) (a + state / W) per call.
- all-gather K/V (lctrain.sp.allgather): the K/V all-gather (forward, and the re-gather in backward) is in flight
  while the rank's own diagonal blocks run, 1/(2 CP) of its attention work (zigzag: its two chunks against
  themselves); exposed = max(0, all-gather - that). The dK/dV reduce-scatter is exposed in full.
- Ulysses: the all-to-alls are blocking: exposed in full.
- Megatron TP all-reduces: forward exposed; backward overlapped with the weight-gradient GEMMs (Megatron's
  async grad all-reduce), exposed = max(0, all-reduces - half the backward matmul time).
- DP x CP gradient reduction by ZeRO stage (ZeRO paper volumes, bf16 gradients/parameters): stages 0-2 move
  2 x 2 psi (n-1)/n bytes per rank (reduce-scatter of gradients + all-gather of parameters, or one all-reduce),
  stage 3 1.5x that (parameters gathered in forward and again in backward). DeepSpeed's defaults (no
  `overlap_comm` for stages 0-2, `overlap_comm` on for stage 3): exposed in full for 0-2; for 3 exposed =
  max(0, comm - compute).
- Optimizer step: AdamW reads and writes ~36 bytes per local parameter (fp32 master, m, v read and written,
  bf16 parameter written, gradient read), memory-bound.

Memory per GPU: the ZeRO paper's mixed-precision states (2 bytes bf16 parameters + 2 gradients + 12 fp32
master/m/v per parameter of this TP shard), partitioned over the DP x CP group by stage
(0: 16 psi; 1: 4 psi + 12 psi / N; 2: 2 psi + 14 psi / N; 3: 16 psi / N), plus the simulated activation peak.
Not counted: the CUDA context and allocator fragmentation, DeepSpeed's bucket buffers, ZeRO-3's gathered
layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from lctrain.plan.hardware import Hardware
from lctrain.plan.simulate import RankSim, model_flops_per_token

ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float
    inter_node: bool


def link_for(hw: Hardware, spans_nodes: bool) -> Link:
    if spans_nodes:
        return Link(hw.inter_node_bytes_per_s * hw.efficiency["inter_link"], hw.inter_node_latency_s, True)
    return Link(hw.intra_node_bytes_per_s * hw.efficiency["intra_link"], hw.intra_node_latency_s, False)


def collective_time(op: str, nbytes: float, n: int, link: Link) -> float:
    """Seconds of one call (formulas in the module docstring); `nbytes` is this rank's payload."""
    if n < 2:
        return 0.0
    a, w = link.latency_s, link.bytes_per_s
    if op in ("all_gather", "all_gather_object"):
        return (n - 1) * (a + nbytes / w)
    if op == "reduce_scatter":
        return (n - 1) * (a + nbytes / (n * w))
    if op == "all_reduce":
        return 2 * (n - 1) * (a + nbytes / (n * w))
    if op == "all_to_all":
        return (n - 1) * a + (n - 1) / n * nbytes / w
    if op == "send":
        return a + nbytes / w
    if op == "recv":
        return 0.0  # counted on the sender
    raise ValueError(f"no time model for collective {op!r}")


def group_spans_nodes(group: str, tp: int, cp: int, dp: int, gpus_per_node: int) -> bool:
    """Whether the TP / CP / DPxCP group of Megatron's tp-cp-dp rank order crosses a node boundary."""
    if group == "tp":
        return gpus_per_node % tp != 0
    if group == "cp":
        return gpus_per_node % (tp * cp) != 0
    return tp * cp * dp > gpus_per_node


def zero_state_bytes(params_local: int, stage: int, n_shard: int) -> float:
    """Parameter + gradient + optimizer bytes per GPU (ZeRO paper, mixed precision Adam: 2 + 2 + 12 per param)."""
    psi = float(params_local)
    if stage == 0:
        return 16 * psi
    if stage == 1:
        return 4 * psi + 12 * psi / n_shard
    if stage == 2:
        return 2 * psi + 14 * psi / n_shard
    if stage == 3:
        return 16 * psi / n_shard
    raise ValueError(f"ZeRO stage must be 0-3, got {stage}")


@dataclass
class StepEstimate:
    """The predicted step of one layout (one micro-batch per DP rank)."""

    compute_s: float
    compute_by_class_s: dict[str, float]
    comm_total_s: float
    """All communication time if nothing overlapped."""
    comm_exposed_s: float
    """What the overlap rules leave on the critical path (SP + TP + DP)."""
    comm_exposed_by_kind_s: dict[str, float]
    optimizer_s: float
    step_s: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    comm_frac: float
    mem_states_bytes: float
    mem_activation_bytes: float
    mem_total_bytes: float
    oom: bool


def _fwd_share(kind: str) -> float:
    return 1.0 / 3.0 if kind == "fwd" else 2.0 / 3.0


def estimate_step(sim: RankSim, hw: Hardware, dp: int, zero_stage: int, gpus_per_node: int) -> StepEstimate:
    """Time and memory of one step of the layout `sim` was simulated for, at DP size `dp` (see module doc)."""
    spec = sim.spec
    tp, cp = spec.tp, spec.cp
    eff, peak = hw.efficiency, hw.peak_bf16_flops
    by_class = {c: f / (peak * eff.get(c, eff["matmul"])) for c, f in sim.flops.items()}
    by_class["memory"] = sim.memory_bound_bytes / (hw.hbm_bytes_per_s * eff["memory"])
    compute = sum(by_class.values())

    links = {g: link_for(hw, group_spans_nodes(g, tp, cp, dp, gpus_per_node)) for g in ("tp", "cp", "dpcp")}
    total = 0.0
    exposed: dict[str, float] = {}
    for c in sim.comm:
        method, _, phase = c.tag.partition(".")
        link = links["tp" if c.group == "tp" else "cp"]
        per_call = c.bytes / c.calls if c.calls else 0.0
        t = c.calls * collective_time(c.op, per_call, c.group_size, link)
        total += t
        share = _fwd_share(phase)
        if method == "ring":
            hidden = by_class.get("attention", 0.0) * share * (cp - 1) / cp
            e = max(0.0, t - hidden)
        elif method == "allgather" and c.op == "all_gather":
            e = max(0.0, t - by_class.get("attention", 0.0) * share / (2 * cp))
        elif method == "lasp2":
            e = max(0.0, t - by_class.get("linear_attention", 0.0) * share)
        elif method == "lasp1":
            if c.op in ("send", "recv"):
                e = c.calls * (cp - 1) * collective_time("send", _lasp1_state_bytes(sim), 2, link)
                total += e - t
            else:
                e = t
        elif method == "megatron" and phase == "bwd":
            e = max(0.0, t - by_class.get("matmul", 0.0) * share / 2)
        else:
            e = t
        exposed[c.tag] = exposed.get(c.tag, 0.0) + e

    n_shard = cp * dp
    grad_bytes = 2.0 * sim.params_local
    dp_t = collective_time("all_reduce", grad_bytes, n_shard, links["dpcp"])
    if zero_stage == 3:
        dp_t *= 1.5
    total += dp_t
    exposed["dp.zero"] = dp_t if zero_stage < 3 else max(0.0, dp_t - compute)
    shard = sim.params_local / (n_shard if zero_stage >= 1 else 1)
    optimizer = 36.0 * shard / (hw.hbm_bytes_per_s * eff["memory"])

    comm_exposed = sum(exposed.values())
    step = compute + comm_exposed + optimizer
    tokens = dp * spec.micro_batch * spec.seq_len
    world = tp * cp * dp
    mfu = model_flops_per_token(spec.model, spec.seq_len) * tokens / (step * world * peak)
    states = zero_state_bytes(sim.params_local, zero_stage, n_shard)
    mem = states + sim.activation_peak_bytes
    return StepEstimate(compute_s=compute, compute_by_class_s=by_class, comm_total_s=total,
                        comm_exposed_s=comm_exposed, comm_exposed_by_kind_s=exposed, optimizer_s=optimizer,
                        step_s=step, tokens_per_step=tokens, tokens_per_s=tokens / step, mfu=mfu,
                        comm_frac=comm_exposed / step, mem_states_bytes=states,
                        mem_activation_bytes=float(sim.activation_peak_bytes), mem_total_bytes=mem,
                        oom=mem > hw.memory_gb * 1e9)


def _lasp1_state_bytes(sim: RankSim) -> float:
    """Bytes of one LASP-1 state message: the largest per-call send of the simulated rank."""
    sizes = [c.bytes / c.calls for c in sim.comm if c.tag.startswith("lasp1") and c.op == "send" and c.calls]
    return max(sizes) if sizes else 0.0


__all__ = ["Link", "StepEstimate", "ZERO_STAGES", "collective_time", "estimate_step", "group_spans_nodes",
           "link_for", "zero_state_bytes"]
