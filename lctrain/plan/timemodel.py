"""Step time and memory per GPU of a layout, from one simulated rank (simulate.py) and one device table.

Compute, per micro-batch: sum over (class, dtype) of FLOPs / (peak[dtype] x efficiency[class]) -- the peak by
the dtype of the op's inputs (bf16 tensor cores, fp32 CUDA cores: hardware.TF32_MATMUL states the TF32
policy) -- plus memory-bound bytes / (HBM bandwidth x efficiency["memory"]). The same sums by scope give the
breakdown by mixer (A, L, D, G), MLP and embed/loss.

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

Overlap: one rule per SP method (`METHOD_RULES`, the one place to extend when a method is added), as the code
runs -- what the collective of a phase (fwd / bwd) can hide behind:
- ring: the send of the next K/V block overlaps the current block's attention: hidden behind (CP-1)/CP of the
  phase's attention.
- allgather (K/V): the all-gather is in flight while the rank's own diagonal blocks run, 1/(2 CP) of its
  attention; the dK/dV reduce-scatter is exposed.
- lasp2, lasp2_delta: the one all-gather is in flight while the intra-chunk part runs (the phase's
  linear-attention compute). Their tree scan (linear_sp="lasp2_tree", tags "....round{k}"): log2(CP) rounds of
  sends behind the recomputed chunk maps backward, and forward behind the state-free local pass (linear and
  gated layers; the delta rule's forward rounds wait for the entering state: exposed).
- halo (sliding window): the halo transfers overlap the band (diagonal) attention.
- lasp1: a serial chain, timed as a critical path (below), not as an overlap.
- ulysses, conv_halo and anything unknown: exposed in full.
- Megatron's TP all-reduces: forward exposed; backward behind half the backward matmuls (async grad all-reduce).

LASP-1's critical path (lctrain/sp/lasp1.py): forward, rank r computes its chunk's state, waits for the state
from r-1, adds them (the per-hop work: a state-sized elementwise pass) and sends; backward, rank r computes its
local gradients, waits for the gradient from r+1, recomputes and differentiates the state it passed on (the
per-hop work: 3 x 2 C h dk dv FLOPs at the state's float32 rate, C its tokens) and sends. Each hop costs
hop = send(state) + per-hop work. The chain is a wavefront: with equal work per rank, rank r runs r hops behind
rank 0 and keeps that lag from layer to layer (no rank waits twice), so the (CP-1) hops are paid once per
segment of the step between two collectives that synchronise the whole CP group (an all-gather, all-to-all,
reduce-scatter, ring, or -- under ZeRO-3 -- every layer's parameter all-gather), per direction:
exposed = segments x (CP-1) x hop. Activation checkpointing breaks the wavefront: a recomputed LASP-1 layer
re-runs its forward chain (rank 0 -> CP-1) inside backward, whose chain runs the other way, so each recomputed
layer pays both chains in full: exposed += recomputed x (CP-1) x (forward hop), and every backward layer is a
segment. The simulated rank is a middle rank (simulate._worst_cp_rank): it does
both the receive and the backward recompute.

The job, not one micro-batch: a step is `accum` = global_batch / (micro_batch x DP) micro-batches, then the
DP x CP gradient reduction and the optimizer. ZeRO by stage, DeepSpeed's defaults (`overlap_comm` off for
stages 0-2, on for 3), bf16 gradients and parameters, psi = parameters of this TP shard, N = DP x CP:
- 0-1: one gradient all-reduce (2 psi bytes) per step, exposed;
- 2: a gradient reduce-scatter per micro-batch plus one parameter all-gather per step, exposed;
- 3: per micro-batch, every layer's parameters all-gathered in forward and again in backward and the
  gradients reduce-scattered behind backward. DeepSpeed prefetches at most `stage3_prefetch_bucket_size`
  (default 5e7) parameters ahead, so of a layer of p parameters a fraction f = min(1, 5e7 / p) is fetched
  behind the previous layer's compute and the rest waits in front of its own; the first layer of each direction
  has nothing to hide behind, and the last layer's gradient reduce-scatter comes after backward. Exposed per
  micro-batch: 2 gather ((1 - f) + f / layers) + scatter / layers, plus whatever the overlapped rest does not
  fit behind the compute left over (compute - exposed SP/TP comm - the SP traffic hidden on the same link).
  So ZeRO-3 trades memory for time: its 1.5x traffic, paid every micro-batch, is at best partly hidden.
- optimizer: AdamW reads and writes ~36 bytes per local parameter (fp32 master, m, v read and written, bf16
  parameter written, gradient read), memory-bound, once per step.

Packed documents (`Job.doc_len`): the model FLOPs of attention (MFU's numerator) are the sum over documents,
sum_i l_i (l_i + 1) / 2 query-key pairs instead of S (S + 1) / 2: a factor (l + 1) / (S + 1) for documents of
length l. The executed attention work shrinks by the same factor only for methods whose kernels skip the
blocks between documents (`MethodRule.docs_skip_blocks`); lctrain's ring and all-gather K/V mask documents
inside the same blocks, so their work stays.

Memory per GPU: the ZeRO paper's mixed-precision states (2 bytes bf16 parameters + 2 gradients + 12 fp32
master/m/v per parameter of this TP shard), partitioned over the DP x CP group by stage
(0: 16 psi; 1: 4 psi + 12 psi / N; 2: 2 psi + 14 psi / N; 3: 16 psi / N, plus two layers' gathered bf16
parameters), plus the simulated activation peak, plus the OOM margin of the device table (fragmentation x the
activation peak, and the reserve for context and NCCL): a plan fits when it all stays within the device.
Pipeline parallelism is not modelled (`lctrain plan` says so when asked for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lctrain.plan.hardware import Hardware
from lctrain.plan.simulate import RankSim, model_flops_per_token, split_key

ZERO_STAGES = (0, 1, 2, 3)
#: DeepSpeed's `stage3_prefetch_bucket_size` default (5e7 parameters): how far ahead ZeRO-3 fetches.
DEEPSPEED_PREFETCH_PARAMS = 5e7
#: Collectives that synchronise every rank of their group (a LASP-1 wavefront cannot run across them).
SYNCING_OPS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float
    inter_node: bool


@dataclass(frozen=True)
class MethodRule:
    """How the collectives of one SP method (its comm tag) meet the compute of the same phase."""

    hidden_by: str | None = None
    """Compute class the collective runs behind ("attention", "linear_attention", "matmul"), or None."""
    hidden_fraction: str = "all"
    """Which part of that class's phase time hides it: "all", "ring" ((CP-1)/CP), "diagonal" (1/(2 CP)),
    "half" (1/2)."""
    ops: tuple[str, ...] | None = None
    """Only these ops overlap (None: every op of the method); the others are exposed."""
    phases: tuple[str, ...] = ("fwd", "bwd")
    """Phases in which the overlap applies (others exposed)."""
    chain: bool = False
    """A serial state chain timed as a critical path (LASP-1)."""
    docs_skip_blocks: bool = False
    """With packed documents its attention kernels skip the blocks between documents."""


#: One rule per SP method / comm tag (the first part of the tag, e.g. "lasp2" of "lasp2.fwd").
METHOD_RULES: dict[str, MethodRule] = {
    "ring": MethodRule("attention", "ring"),
    "allgather": MethodRule("attention", "diagonal", ops=("all_gather",)),
    "lasp2": MethodRule("linear_attention"),
    "lasp2_delta": MethodRule("linear_attention"),
    "halo": MethodRule("attention", "all", docs_skip_blocks=True),
    # LASP-2's tree scan (tags "lasp2.fwd.round0", ...): backward rounds overlap the recomputed chunk maps;
    # forward rounds overlap the state-free local pass for linear / gated layers, while the delta rule's local
    # pass waits for its entering state.
    "lasp2_tree": MethodRule("linear_attention"),
    "lasp2_delta_tree": MethodRule("linear_attention", phases=("bwd",)),
    "lasp1": MethodRule(chain=True),
    "lasp1_delta": MethodRule(chain=True),
    "ulysses": MethodRule(),
    "conv_halo": MethodRule(),
    "megatron": MethodRule("matmul", "half", phases=("bwd",)),
}
_UNKNOWN = MethodRule()


def rule_key(tag: str) -> tuple[str, str]:
    """(METHOD_RULES key, phase) of a comm tag: "lasp2.fwd" -> ("lasp2", "fwd"); a tree scan's rounds
    "lasp2.bwd.round1" -> ("lasp2_tree", "bwd")."""
    parts = tag.split(".")
    method, phase = parts[0], (parts[1] if len(parts) > 1 else "")
    if any(p.startswith("round") for p in parts[2:]):
        method += "_tree"
    return method, phase


def register_method_rule(tag: str, rule: MethodRule) -> None:
    """Time the collectives tagged `tag` (an SP method added later) by `rule`."""
    METHOD_RULES[tag] = rule


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


@dataclass(frozen=True)
class Job:
    """The job around one micro-batch."""

    global_batch: int | None = None
    """Sequences per optimizer step (all DP ranks); None: one micro-batch per DP rank (no accumulation)."""
    doc_len: int | None = None
    """Packed documents of this many tokens each (None: one document per sequence)."""

    def accumulation(self, micro_batch: int, dp: int) -> int:
        """Micro-batches per step on each DP rank; ValueError when the global batch does not split."""
        if self.global_batch is None:
            return 1
        per = micro_batch * dp
        if self.global_batch < 1 or self.global_batch % per:
            raise ValueError(f"global batch {self.global_batch} is not a positive multiple of micro-batch x DP "
                             f"= {micro_batch} x {dp} = {per}")
        return self.global_batch // per

    def attention_factor(self, seq_len: int) -> float:
        """Causal query-key pairs of packed documents / those of one document of `seq_len`."""
        if self.doc_len is None or self.doc_len >= seq_len:
            return 1.0
        if self.doc_len < 1:
            raise ValueError(f"document length must be >= 1, got {self.doc_len}")
        n_full, rest = divmod(seq_len, self.doc_len)
        pairs = n_full * self.doc_len * (self.doc_len + 1) / 2 + rest * (rest + 1) / 2
        return pairs / (seq_len * (seq_len + 1) / 2)


@dataclass
class StepEstimate:
    """The predicted optimizer step of one layout (`accum` micro-batches per DP rank)."""

    compute_s: float
    """Compute of the step (all micro-batches)."""
    compute_by_class_s: dict[str, float]
    """By class (matmul, attention, linear_attention; "memory" = memory-bound), whole step."""
    compute_by_scope_s: dict[str, float]
    """By mixer scope (A, L, D, G, MLP, embed/loss), FLOPs and memory-bound together, whole step."""
    memory_bound_s: float
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
    mem_margin_bytes: float
    """OOM margin: fragmentation x activations + the device's reserve."""
    mem_total_bytes: float
    oom: bool
    accumulation: int = 1
    comm_total_by_kind_s: dict[str, float] = field(default_factory=dict)


def _phase_share(phase: str) -> float:
    return 1.0 / 3.0 if phase == "fwd" else 2.0 / 3.0


def compute_times(sim: RankSim, hw: Hardware, attention_factor: float = 1.0,
                  docs_skip: bool = False) -> tuple[dict[str, float], dict[str, float], float]:
    """(seconds by class, seconds by scope, memory-bound seconds) of one micro-batch."""
    eff = hw.efficiency
    by_class: dict[str, float] = {}
    by_scope: dict[str, float] = {}
    detail = sim.flops_detail or {f"embed/loss|{c}|bf16": f for c, f in sim.flops.items()}
    for key, flops in detail.items():
        scope, cls, dtype = split_key(key)
        t = flops / (hw.peak_for(dtype) * eff.get(cls, eff["matmul"]))
        if cls == "attention" and docs_skip:
            t *= attention_factor
        by_class[cls] = by_class.get(cls, 0.0) + t
        by_scope[scope] = by_scope.get(scope, 0.0) + t
    bw = hw.hbm_bytes_per_s * eff["memory"]
    bdetail = sim.bytes_detail or {"embed/loss|elementwise|": sim.memory_bound_bytes}
    for key, nbytes in bdetail.items():
        scope = split_key(key)[0]
        by_scope[scope] = by_scope.get(scope, 0.0) + nbytes / bw
    memory = sum(bdetail.values()) / bw
    by_class["memory"] = memory
    return by_class, by_scope, memory


def _hidden(rule: MethodRule, by_class: dict[str, float], phase: str, cp: int) -> float:
    if rule.hidden_by is None or phase not in rule.phases:
        return 0.0
    t = by_class.get(rule.hidden_by, 0.0) * _phase_share(phase)
    frac = {"all": 1.0, "ring": (cp - 1) / cp, "diagonal": 1 / (2 * cp), "half": 0.5}[rule.hidden_fraction]
    return t * frac


def lasp1_hop_work_s(sim: RankSim, hw: Hardware, state_bytes: float, phase: str) -> float:
    """The work one hop of LASP-1's chain waits for (module docstring): forward the state-sized add
    (read two states, write one), backward 3 x 2 C (b h dk dv) FLOPs of the recomputed state and its gradient
    at the float32 rate, with C = this rank's tokens and b h dk dv = state_bytes / 4 (float32 states)."""
    if phase == "fwd":
        return 3 * state_bytes / (hw.hbm_bytes_per_s * hw.efficiency["memory"])
    c = sim.spec.seq_len // sim.spec.cp
    return 6.0 * c * (state_bytes / 4) / (hw.peak_for("fp32") * hw.efficiency["linear_attention"])


def _lasp1_segments(sim: RankSim, phase: str, chain_calls: float, zero_stage: int) -> float:
    """Segments of a phase between CP-wide synchronising collectives (module docstring)."""
    if zero_stage == 3:
        return chain_calls
    syncs = sum(c.calls for c in sim.comm if c.group == "cp" and c.tag.endswith("." + phase)
                and not METHOD_RULES.get(rule_key(c.tag)[0], _UNKNOWN).chain
                and (c.op in SYNCING_OPS or c.tag.startswith("ring")))
    return min(chain_calls, syncs + 1)


def estimate_step(sim: RankSim, hw: Hardware, dp: int, zero_stage: int, gpus_per_node: int,
                  job: Job | None = None) -> StepEstimate:
    """Time and memory of one optimizer step of the layout `sim` was simulated for, at DP size `dp` (module
    docstring)."""
    job = job or Job()
    spec = sim.spec
    tp, cp = spec.tp, spec.cp
    accum = job.accumulation(spec.micro_batch, dp)
    attn_factor = job.attention_factor(spec.seq_len)
    # One rank (CP = 1) runs the local varlen kernel (flash-attn's skips the blocks between documents).
    docs_skip = cp == 1 or any(METHOD_RULES.get(m, _UNKNOWN).docs_skip_blocks for m in _methods(sim))
    by_class, by_scope, memory = compute_times(sim, hw, attn_factor, docs_skip)
    compute = sum(by_class.values())

    links = {g: link_for(hw, group_spans_nodes(g, tp, cp, dp, gpus_per_node)) for g in ("tp", "cp", "dpcp")}
    total: dict[str, float] = {}
    exposed: dict[str, float] = {}
    chain_calls: dict[tuple[str, str], float] = {}
    for c in sim.comm:
        method, phase = rule_key(c.tag)
        rule = METHOD_RULES.get(method, _UNKNOWN)
        link = links["tp" if c.group == "tp" else "cp"]
        per_call = c.bytes / c.calls if c.calls else 0.0
        t = c.calls * collective_time(c.op, per_call, c.group_size, link)
        if rule.chain:
            if c.op == "send":
                chain_calls[(c.tag, phase)] = chain_calls.get((c.tag, phase), 0.0) + c.calls
                e = 0.0  # the chain's critical path, below
            else:
                e = t
        elif rule.ops is not None and c.op not in rule.ops:
            e = t
        else:
            e = max(0.0, t - _hidden(rule, by_class, phase, cp))
        total[c.tag] = total.get(c.tag, 0.0) + t
        exposed[c.tag] = exposed.get(c.tag, 0.0) + e
    for method in sorted({tag.partition(".")[0] for tag, _ in chain_calls}):
        fwd, bwd = chain_calls.get((f"{method}.fwd", "fwd"), 0.0), chain_calls.get((f"{method}.bwd", "bwd"), 0.0)
        # Activation checkpointing re-runs the forward chain (rank 0 -> P-1) inside backward, whose chain runs
        # the other way (P-1 -> 0): every recomputed layer pays both chains in full, no wavefront.
        recomputed = max(0.0, fwd - bwd) if bwd else 0.0
        hops = {}
        for phase in ("fwd", "bwd"):
            tag = f"{method}.{phase}"
            sizes = [c.bytes / c.calls for c in sim.comm if c.tag == tag and c.op == "send" and c.calls]
            state = max(sizes) if sizes else 0.0
            hops[phase] = collective_time("send", state, 2, links["cp"]) + lasp1_hop_work_s(sim, hw, state, phase)
        fwd_segments = _lasp1_segments(sim, "fwd", fwd - recomputed, zero_stage) + recomputed
        bwd_segments = bwd if recomputed else _lasp1_segments(sim, "bwd", bwd, zero_stage)
        exposed[f"{method}.fwd"] = exposed.get(f"{method}.fwd", 0.0) + fwd_segments * (cp - 1) * hops["fwd"]
        exposed[f"{method}.bwd"] = exposed.get(f"{method}.bwd", 0.0) + bwd_segments * (cp - 1) * hops["bwd"]

    micro_exposed = sum(exposed.values())
    total = {k: v * accum for k, v in total.items()}
    exposed = {k: v * accum for k, v in exposed.items()}

    # DP x CP: gradients and parameters by ZeRO stage (module docstring), bf16.
    n_shard = cp * dp
    psi = float(sim.params_local)
    dl = links["dpcp"]
    layers = max(1, spec.model.num_layers)
    if psi == 0:  # nothing to reduce (e.g. an SP function simulated alone)
        dp_total = dp_exposed = 0.0
    elif zero_stage <= 1:
        dp_total = collective_time("all_reduce", 2 * psi, n_shard, dl)
        dp_exposed = dp_total
    elif zero_stage == 2:
        dp_total = (accum * collective_time("reduce_scatter", 2 * psi, n_shard, dl)
                    + collective_time("all_gather", 2 * psi / n_shard, n_shard, dl))
        dp_exposed = dp_total
    else:
        gather = collective_time("all_gather", 2 * psi / n_shard, n_shard, dl)  # every layer, once
        scatter = collective_time("reduce_scatter", 2 * psi, n_shard, dl)
        per_micro = 2 * gather + scatter
        dp_total = accum * per_micro
        prefetched = min(1.0, DEEPSPEED_PREFETCH_PARAMS * layers / psi) if psi else 1.0
        # Not prefetched: the first layer of each direction, and the part of every layer beyond the window;
        # the last layer's gradients are reduced after backward ends.
        waits = 2 * gather * (1 - prefetched) + 2 * gather * prefetched / layers + scatter / layers
        # The overlapped traffic shares the link with the SP collectives hidden behind the same compute.
        shared = sum(total[k] - exposed[k] for k in total if k.partition(".")[0] != "megatron") \
            if links["cp"].inter_node == dl.inter_node else 0.0
        room = accum * max(0.0, compute - micro_exposed - shared)
        dp_exposed = accum * waits + max(0.0, dp_total - accum * waits - room)
    total["dp.zero"] = dp_total
    exposed["dp.zero"] = dp_exposed
    shard = psi / (n_shard if zero_stage >= 1 else 1)
    optimizer = 36.0 * shard / (hw.hbm_bytes_per_s * hw.efficiency["memory"])

    comm_exposed = sum(exposed.values())
    step = accum * compute + comm_exposed + optimizer
    tokens = accum * dp * spec.micro_batch * spec.seq_len
    world = tp * cp * dp
    mfu = model_flops_per_token(spec.model, spec.seq_len, job.doc_len) * tokens / (step * world * hw.peak_bf16_flops)
    states = zero_state_bytes(sim.params_local, zero_stage, n_shard)
    if zero_stage == 3:
        states += 2 * 2 * psi / layers  # the gathered layer and the prefetched next one, bf16
    act = float(sim.activation_peak_bytes)
    margin = hw.fragmentation * act + hw.memory_reserve_gb * 1e9
    mem = states + act + margin
    return StepEstimate(compute_s=accum * compute, compute_by_class_s={k: accum * v for k, v in by_class.items()},
                        compute_by_scope_s={k: accum * v for k, v in by_scope.items()}, memory_bound_s=accum * memory,
                        comm_total_s=sum(total.values()), comm_exposed_s=comm_exposed, comm_exposed_by_kind_s=exposed,
                        optimizer_s=optimizer, step_s=step, tokens_per_step=tokens, tokens_per_s=tokens / step,
                        mfu=mfu, comm_frac=comm_exposed / step, mem_states_bytes=states, mem_activation_bytes=act,
                        mem_margin_bytes=margin, mem_total_bytes=mem, oom=mem > hw.memory_gb * 1e9,
                        accumulation=accum, comm_total_by_kind_s=total)


def _methods(sim: RankSim) -> set[str]:
    return {rule_key(c.tag)[0] for c in sim.comm}


__all__ = ["Job", "Link", "METHOD_RULES", "MethodRule", "StepEstimate", "ZERO_STAGES", "collective_time",
           "compute_times", "estimate_step", "group_spans_nodes", "lasp1_hop_work_s", "link_for",
           "register_method_rule", "rule_key", "zero_state_bytes"]
