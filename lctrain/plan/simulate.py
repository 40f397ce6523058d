"""Simulate one rank of a real lctrain training step on the CPU, without allocating it.

The rank's real code runs: lctrain's own `build_model` (Megatron-core TP layers, the config's SP methods)
inside lctrain's `init_mesh`, in the rehearsal's fake world (`lctrain.rehearse.world.fake_world`: a `meta:fake`
process group of the job's TP x CP size whose collectives return at once, meta tensors -- shapes, dtypes and
storage sizes, no data -- dispatched as GPU tensors, so the GPU branches run). One forward + backward of one
micro-batch is watched by

- the rehearsal's `MemoryWatcher` (lctrain.rehearse.watch): every storage created and freed; its peak is the
  activation peak (parameter gradients are dropped as they are produced: the ZeRO rule counts them). The
  planner's memory and `lctrain rehearse`'s are one machinery;
- `StepTracker` (here): FLOPs by (scope, class, dtype) -- `matmul` (mm/addmm: the projections, TP-split),
  `attention` (the SDPA / flash kernels, causal-aware formulas registered here) and `linear_attention` (bmm,
  triangular solves: the chunked scans and state products; under `kernels="gpu"` one opaque op per local
  linear-attention call with the Triton / fla kernel's FLOP count); and memory-bound bytes of the ops that move
  tensor data, by explicit per-op rules (`memory_op_bytes`: views, metadata and uninitialised allocations move
  nothing; a broadcast operand is read once; a gather reads only its rows);
- every collective: lctrain's (SP methods, through `lctrain.parallel.comm.record_comm`, on the CP group)
  and Megatron's TP all-reduces (it calls torch.distributed directly: wrapped here while the step runs).

Why the simulated world is TP x CP and not the job's: one micro-batch's forward + backward issues no DP
collective (DeepSpeed reduces gradients after it, modelled in timemodel.py by the ZeRO rule), and every
TP or CP group of the job has the same size and rank order, so a rank of a TP x CP world does exactly what
a rank of the job does.

Which rank: under the zigzag layout every CP rank does the same work (causal balance); under the
contiguous layout the last CP rank does the most attention work (its queries see every block), so it is
the one simulated, except with LASP-1: there a middle rank (CP-2) is, because it both receives and sends the
state and in backward recomputes the state it passed on (the chain itself is timed in timemodel.py).

Activation checkpointing ("none" | "selective" | "full") is the model's own (`model.activation_checkpointing`,
lctrain/models/hybrid.py): the simulated step recomputes, and re-issues collectives, exactly as training does.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lctrain.models.config import ModelConfig

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")
KERNELS = ("cpu", "gpu")
_SP_TAGS = ("lasp2", "lasp1", "ring", "allgather", "ulysses")

aten = torch.ops.aten


@dataclass(frozen=True)
class SimSpec:
    """What to simulate: the model, the layout of one rank and the micro-batch."""

    model: ModelConfig
    tp: int = 1
    cp: int = 1
    cp_layout: str = "zigzag"
    seq_len: int = 1024
    """Global sequence length (split over CP)."""
    micro_batch: int = 1
    dtype: str = "bfloat16"
    """Compute dtype of parameters and activations (bf16 on GPU, as the trainer's "auto")."""
    activation_checkpointing: str = "none"
    kernels: str = "gpu"
    """"gpu": the local linear attention is one opaque op per call with the Triton kernel's saved tensors
    and FLOPs; "cpu": the real CPU backends run (what a gloo run does; used to validate against one)."""
    cp_rank: int | None = None
    """CP rank to simulate; None: the worst one (see module docstring)."""

    def validate(self) -> None:
        for name in ("tp", "cp", "seq_len", "micro_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, "
                             f"got {self.activation_checkpointing!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16 or float64, got {self.dtype!r}")
        parts = 2 * self.cp if self.cp_layout == "zigzag" else self.cp
        if self.cp_layout not in ("zigzag", "contiguous"):
            raise ValueError(f"cp_layout must be zigzag or contiguous, got {self.cp_layout!r}")
        if self.seq_len % parts:
            raise ValueError(f"sequence length {self.seq_len} is not divisible by "
                             f"{'2*CP' if self.cp_layout == 'zigzag' else 'CP'} = {parts} (CP={self.cp})")
        self.model.validate_parallel(self.tp, self.cp, self.cp_layout)


@dataclass
class CommStat:
    """Calls and bytes (this rank's payload, as lctrain.parallel.comm counts them) of one kind of collective."""

    group: str  # "tp" | "cp"
    op: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send | recv
    tag: str  # the comm_tag, e.g. "lasp2.fwd"; Megatron's: "megatron.fwd" / "megatron.bwd"
    group_size: int
    calls: int = 0
    bytes: int = 0


@dataclass
class RankSim:
    """One simulated rank: what it holds, computes and sends in one micro-batch's forward + backward."""

    spec: SimSpec
    world: int
    params_local: int
    """Parameters this rank holds (its TP shard)."""
    params_tp_replicated: int
    """Of which replicated on every TP rank (norm scales)."""
    param_bytes: int
    """Bytes of those parameters in the compute dtype."""
    activation_peak_bytes: int
    """Peak of the step's live storages (activations, temporaries, comm buffers), without parameter grads."""
    activation_after_forward_bytes: int
    """Storages alive when the forward ends (what is kept for backward)."""
    flops: dict[str, float]
    """FLOPs of forward + backward by class: matmul, attention, linear_attention."""
    memory_bound_bytes: float
    """Bytes read + written by all other (elementwise, reduction, copy) ops, forward + backward."""
    comm: list[CommStat]
    sim_seconds: float
    ops: int = 0
    flops_detail: dict[str, float] = field(default_factory=dict)
    """FLOPs by "scope|class|dtype": scope = the mixer letter of the layer (A, L, D, G), "MLP" or "embed/loss";
    class = matmul | attention | linear_attention; dtype = bf16 | fp16 | fp32 | fp64 (the inputs')."""
    bytes_detail: dict[str, float] = field(default_factory=dict)
    """Memory-bound bytes by "scope|class|": class = elementwise | reduction | copy | fill."""

    @property
    def tokens(self) -> int:
        """Tokens of this rank in the micro-batch."""
        return self.spec.micro_batch * self.spec.seq_len // self.spec.cp

    def comm_bytes(self, group: str | None = None, phase: str | None = None) -> int:
        return sum(c.bytes for c in self.comm if (group is None or c.group == group)
                   and (phase is None or c.tag.endswith(phase)))

    def comm_calls(self, group: str | None = None, phase: str | None = None) -> int:
        return sum(c.calls for c in self.comm if (group is None or c.group == group)
                   and (phase is None or c.tag.endswith(phase)))

    def to_dict(self) -> dict[str, Any]:
        return {"world": self.world, "params_local": self.params_local, "param_bytes": self.param_bytes,
                "activation_peak_bytes": self.activation_peak_bytes,
                "activation_after_forward_bytes": self.activation_after_forward_bytes,
                "flops": dict(self.flops), "memory_bound_bytes": self.memory_bound_bytes,
                "comm": [vars(c) for c in self.comm], "sim_seconds": self.sim_seconds,
                "flops_detail": dict(self.flops_detail), "bytes_detail": dict(self.bytes_detail),
                "memory_bound_bytes_by_class": self.bytes_by("class"), "flops_by_scope": self.flops_by("scope")}

    def bytes_by(self, part: str) -> dict[str, float]:
        """Memory-bound bytes summed by "scope" or "class"."""
        i = ("scope", "class").index(part)
        out: dict[str, float] = {}
        for key, v in self.bytes_detail.items():
            k = split_key(key)[i]
            out[k] = out.get(k, 0.0) + v
        return out

    def flops_by(self, part: str) -> dict[str, float]:
        """FLOPs summed by "scope", "class" or "dtype"."""
        i = ("scope", "class", "dtype").index(part)
        out: dict[str, float] = {}
        for key, v in self.flops_detail.items():
            k = split_key(key)[i]
            out[k] = out.get(k, 0.0) + v
        return out


# ------------------------------------------------------------------------------------------------ FLOPs


def _attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    """q.k^T and p.v: 2 * 2 * b * h * sq * sk * d; a square causal problem does about half of it."""
    pairs = sq * sk
    if causal and sq == sk:
        pairs = sq * (sq + 1) / 2
    return 4.0 * b * h * pairs * d


def _sdpa_cpu_fwd(q, k, v, dropout_p=0.0, is_causal=False, *args, **kwargs) -> float:
    b, h, sq, d = q.shape
    return _attention_flops(b, h, sq, k.shape[2], d, bool(is_causal))


def _sdpa_cpu_bwd(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, **kwargs) -> float:
    b, h, sq, d = q.shape
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: four products of the forward's size / 2 each.
    return 2.0 * _attention_flops(b, h, sq, k.shape[2], d, bool(is_causal))


def _matmul_flops(func, args, out) -> float:
    from torch.utils.flop_counter import flop_registry

    return float(flop_registry[func._overloadpacket](*args, out_val=out))


# --------------------------------------------------------------- the GPU linear-attention kernel, as a model

#: Sequence block of the Triton lightning-attention kernel (kernels/lightning_attention/chunk.py, BLOCK).
LIGHTNING_BLOCK = 64


def lightning_flops_fwd(b: int, s: int, h: int, dk: int, dv: int, block: int = LIGHTNING_BLOCK) -> float:
    """The Triton kernel's forward per token and head: q.k^T and scores.v over its block (2*block*(dk+dv)),
    q.S and the state update k^T v (2 * 2 * dk * dv)."""
    return float(b * s * h * (2 * block * (dk + dv) + 4 * dk * dv))


_PLAN_OPS: dict[str, Any] = {}


def _register_plan_op() -> None:
    """A local linear-attention backend "plan_gpu": one opaque op whose saved tensors are the Triton kernel's
    (q, k, v, initial state) and whose FLOPs are `lightning_flops_fwd` (backward: twice that)."""
    if _PLAN_OPS:
        return
    lib = torch.library.Library("lctrain_plan", "DEF")
    lib.define("lightning(Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? state) -> (Tensor, Tensor)")
    lib.define("lightning_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor? log_decay, Tensor? state) "
               "-> (Tensor, Tensor, Tensor, Tensor)")

    def fwd_meta(q, k, v, log_decay, state):
        b, _, h, dk = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        return torch.empty_like(v), q.new_empty((b, h, dk, v.shape[-1]), dtype=acc)

    def bwd_meta(do, q, k, v, log_decay, state):
        b, _, h, dk = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                q.new_empty((b, h, dk, v.shape[-1]), dtype=acc))

    for key in ("Meta", "CPU"):
        lib.impl("lightning", fwd_meta, key)
        lib.impl("lightning_bwd", bwd_meta, key)
    _register_plan_op.lib = lib  # keep the library alive
    _PLAN_OPS.update(fwd=torch.ops.lctrain_plan.lightning, bwd=torch.ops.lctrain_plan.lightning_bwd)


class _PlanLightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, state):
        o, final = torch.ops.lctrain_plan.lightning(q, k, v, log_decay, state)
        ctx.save_for_backward(q, k, v, log_decay, state)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, log_decay, state = ctx.saved_tensors
        dq, dk, dv, ds = torch.ops.lctrain_plan.lightning_bwd(do, q, k, v, log_decay, state)
        return dq, dk, dv, None, (ds if state is not None else None)


def _plan_linear_attention(q, k, v, log_decay=None, initial_state=None, output_final_state=False):
    o, final = _PlanLightning.apply(q, k, v, log_decay, initial_state)
    return o, (final if output_final_state else None)


#: Chunk length of fla's chunk kernels (chunk_gated_delta_rule, chunk_gla: BT = 64).
FLA_CHUNK = 64


def gated_delta_flops_fwd(b: int, s: int, h: int, dk: int, dv: int, chunk: int = FLA_CHUNK) -> float:
    """fla's chunk_gated_delta_rule forward per token and head, by kernel: A = beta K K^T within the chunk
    (2 C dk), its unit-triangular inverse (C^2 / 3), W = A (beta e^g K) and U = A (beta V) (2 C dk + 2 C dv),
    the state pass v_new = U - W S, S = e^g S + K^T v_new (4 dk dv), the output q S + (q K^T masked) v_new
    (2 dk dv + 2 C dk + 2 C dv): 6 C dk + 4 C dv + C^2/3 + 6 dk dv."""
    return float(b * s * h * (6 * chunk * dk + 4 * chunk * dv + chunk * chunk / 3 + 6 * dk * dv))


def gated_delta_flops_bwd(b: int, s: int, h: int, dk: int, dv: int, chunk: int = FLA_CHUNK) -> float:
    """Backward: twice the forward's products plus the recomputed W, U and state pass (fla recomputes them
    in backward instead of saving them): 2 fwd + (2 C dk + 2 C dv + 4 dk dv) per token and head."""
    return 2 * gated_delta_flops_fwd(b, s, h, dk, dv, chunk) + float(
        b * s * h * (2 * chunk * dk + 2 * chunk * dv + 4 * dk * dv))


def gla_flops_fwd(b: int, s: int, h: int, dk: int, dv: int, chunk: int = FLA_CHUNK) -> float:
    """fla's chunk_gla forward per token and head: gated q k^T and scores v within the chunk (2 C (dk + dv)),
    q S and the state update k^T v (4 dk dv) -- the lightning kernel's count; backward twice that."""
    return lightning_flops_fwd(b, s, h, dk, dv, chunk)


def _register_gated_plan_ops() -> None:
    """Opaque ops for fla's chunk kernels: saved tensors q, k, v, g, beta, state (what fla keeps), FLOPs by
    the formulas above; absent optional inputs come back as empty gradients."""
    if "gated" in _PLAN_OPS:
        return
    lib = torch.library.Library("lctrain_plan_gated", "DEF")
    lib.define("gated(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? state, int kind) "
               "-> (Tensor, Tensor)")
    lib.define("gated_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? beta, Tensor? state, "
               "int kind) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

    def fwd_meta(q, k, v, g, beta, state, kind):
        b, _, h, dk = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        return torch.empty_like(v), q.new_empty((b, h, dk, v.shape[-1]), dtype=acc)

    def bwd_meta(do, q, k, v, g, beta, state, kind):
        def like(t):
            return torch.empty_like(t) if t is not None else q.new_empty((0,))
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(g), like(beta), like(state))

    for key in ("Meta", "CPU"):
        lib.impl("gated", fwd_meta, key)
        lib.impl("gated_bwd", bwd_meta, key)
    _register_gated_plan_ops.lib = lib
    _PLAN_OPS.update(gated=torch.ops.lctrain_plan_gated.gated, gated_bwd=torch.ops.lctrain_plan_gated.gated_bwd)


class _PlanGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, state, kind):
        o, final = torch.ops.lctrain_plan_gated.gated(q, k, v, g, beta, state, kind)
        ctx.kind = kind
        ctx.save_for_backward(q, k, v, g, beta, state)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, beta, state = ctx.saved_tensors
        grads = torch.ops.lctrain_plan_gated.gated_bwd(do, q, k, v, g, beta, state, ctx.kind)
        dq, dk, dv, dg, dbeta, ds = grads
        return (dq, dk, dv, dg if g is not None else None, dbeta if beta is not None else None,
                ds if state is not None else None, None)


def _plan_gated_delta(q, k, v, g, beta, scale=1.0, initial_state=None, output_final_state=False):
    o, final = _PlanGated.apply(q, k, v, g, beta, initial_state, 1)
    return o, (final if output_final_state else None)


def _plan_gla(q, k, v, g=None, scale=1.0, initial_state=None, output_final_state=False):
    o, final = _PlanGated.apply(q, k, v, g, None, initial_state, 0)
    return o, (final if output_final_state else None)


def _solve_triangular_flops(args) -> float:
    """A [.., n, n] triangular solve against B [.., n, k]: forward substitution does n (n - 1) / 2
    multiply-adds per right-hand column, ~n^2 k FLOPs per matrix."""
    a, rhs = args[0], args[1]
    n = a.shape[-1]
    batch = rhs.numel() // (rhs.shape[-2] * rhs.shape[-1])
    return float(batch * n * n * rhs.shape[-1])


#: The CUDA SDPA kernels (what meta tensors dispatched as GPU tensors call): (q index, k index, is_causal index,
#: FLOPs / forward FLOPs) -- backward does the four products of the forward's size / 2 each: 2x.
_GPU_SDPA = {
    aten._scaled_dot_product_flash_attention: (0, 1, 4, 1.0),
    aten._scaled_dot_product_efficient_attention: (0, 1, 6, 1.0),
    aten._scaled_dot_product_cudnn_attention: (0, 1, 6, 1.0),
    aten._scaled_dot_product_flash_attention_backward: (1, 2, 11, 2.0),
    aten._scaled_dot_product_efficient_attention_backward: (1, 2, 11, 2.0),
    aten._scaled_dot_product_cudnn_attention_backward: (1, 2, 14, 2.0),
}


#: lctrain's own attention custom ops (flash-attn's and the Triton kernel's, `[b, s, h, d]`): (q index, k index,
#: causal index, FLOPs / forward FLOPs).
_LCTRAIN_ATTENTION = {"flash_attn_fwd": (0, 1, 3, 1.0), "flash_attn_bwd": (1, 2, 6, 2.0),
                      "flash_attention_fwd": (0, 1, 3, 1.0), "flash_attention_bwd": (1, 2, 6, 2.0)}


def _flop_formula(func, args, out) -> tuple[str, float] | None:
    """(class, FLOPs) of one aten/plan op, or None for memory-bound ops."""
    packet = func._overloadpacket
    if packet in (aten.mm, aten.addmm):
        return "matmul", _matmul_flops(func, args, out)
    if packet in (aten.bmm, aten.baddbmm):
        return "linear_attention", _matmul_flops(func, args, out)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        return "attention", _sdpa_cpu_fwd(*args)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return "attention", _sdpa_cpu_bwd(*args)
    if func.namespace == "lctrain" and packet.__name__ in _LCTRAIN_ATTENTION:
        qi, ki, ci, factor = _LCTRAIN_ATTENTION[packet.__name__]
        q, k = args[qi], args[ki]  # [b, s, h, d]
        return "attention", factor * _attention_flops(q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.shape[3],
                                                      bool(args[ci]))
    if packet in _GPU_SDPA:
        qi, ki, ci, factor = _GPU_SDPA[packet]
        q, k = args[qi], args[ki]
        causal = bool(args[ci]) if len(args) > ci else False
        return "attention", factor * _attention_flops(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                                      causal)
    if packet is aten.linalg_solve_triangular:
        return "linear_attention", _solve_triangular_flops(args)
    if "gated" in _PLAN_OPS and packet in (_PLAN_OPS["gated"], _PLAN_OPS["gated_bwd"]):
        bwd = packet is _PLAN_OPS["gated_bwd"]
        q, v, kind = args[1 if bwd else 0], args[3 if bwd else 2], args[-1]
        shape = (q.shape[0], q.shape[1], q.shape[2], q.shape[3], v.shape[3])
        if kind == 1:
            return "linear_attention", gated_delta_flops_bwd(*shape) if bwd else gated_delta_flops_fwd(*shape)
        return "linear_attention", (2 if bwd else 1) * gla_flops_fwd(*shape)
    if "fwd" in _PLAN_OPS:
        if packet is _PLAN_OPS["fwd"]:
            q, v = args[0], args[2]
            return "linear_attention", lightning_flops_fwd(q.shape[0], q.shape[1], q.shape[2], q.shape[3], v.shape[3])
        if packet is _PLAN_OPS["bwd"]:
            q, v = args[1], args[3]
            return "linear_attention", 2 * lightning_flops_fwd(q.shape[0], q.shape[1], q.shape[2], q.shape[3],
                                                               v.shape[3])
    return None


# ------------------------------------------------------------------------------------- memory-bound bytes
#
# Which ops move tensor data, and how many bytes (read + written) each moves. An explicit list per op, tested op
# by op in tests/plan/test_membytes.py; an op not named below is an elementwise-like op that reads its inputs and
# writes its outputs.

#: Ops that move no tensor data: views and aliases, metadata queries, allocation without initialisation.
NO_DATA_OPS = frozenset({
    "detach", "alias", "lift_fresh", "_unsafe_view", "view", "t", "expand", "as_strided", "_reshape_alias",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_", "device",
    "promote_types", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "result_type",
    "_has_compatible_shallow_copy_type", "size", "stride", "dim", "is_contiguous", "_local_scalar_dense",
    "record_stream", "_conj", "_neg_view", "resolve_conj", "resolve_neg",
})
#: Ops that only write their output (memset, iota): output bytes.
FILL_OPS = frozenset({
    "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full", "fill_",
    "zero_", "arange", "scalar_tensor", "eye", "linspace", "tril_indices", "triu_indices",
})
#: Ops that read only the rows their index selects: index bytes + 2 x output bytes (read the rows, write them).
GATHER_OPS = frozenset({"embedding", "index", "index_select", "gather", "_unsafe_index", "take"})
#: In-place scatters into a larger tensor: they read index + source and write the source's size into `self`.
SCATTER_OPS = frozenset({"index_put_", "index_put", "index_copy_", "index_copy", "index_add_", "index_add",
                         "scatter_", "scatter", "scatter_add_", "scatter_add", "_index_put_impl_",
                         "index_fill_", "masked_scatter_"})
COPY_OPS = frozenset({"copy_", "_to_copy", "clone", "cat", "stack", "constant_pad_nd", "slice_backward",
                      "select_backward", "slice_scatter", "select_scatter", "repeat", "flip", "roll", "contiguous",
                      "embedding_dense_backward", "_copy_from", "_copy_from_and_resize", "tril", "triu",
                      "diagonal_backward", "as_strided_scatter", "unfold_backward"})
REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "norm",
                           "linalg_vector_norm", "logsumexp", "cumsum", "cumprod", "prod", "all", "any", "argmax",
                           "argmin", "_softmax", "_log_softmax", "_softmax_backward_data",
                           "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward",
                           "nll_loss2d_forward", "nll_loss2d_backward", "logcumsumexp", "aminmax"})
MEMORY_CLASSES = ("elementwise", "reduction", "copy", "fill")


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes of distinct elements a kernel touches in `t`: a broadcast (stride-0) dimension is read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    flat, _ = tree_flatten(x)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def memory_op_bytes(func, args, kwargs, out) -> tuple[str, int] | None:
    """(memory class, bytes read + written) of one op that is not a FLOP op, or None when it moves no data."""
    if func.is_view or func.namespace == "prim":
        return None
    name = func._overloadpacket.__name__
    if name in NO_DATA_OPS:
        return None
    outs = _tensors(out)
    if name in FILL_OPS:
        return "fill", sum(_touched_bytes(t) for t in outs)
    if name == "copy_":  # copy_(dst, src): read src, write dst
        return "copy", _touched_bytes(args[1]) + _touched_bytes(args[0]) if isinstance(args[1], torch.Tensor) \
            else _touched_bytes(args[0])
    kwargs = dict(kwargs or {})
    written = kwargs.pop("out", None)
    ins = _tensors((args, kwargs))
    if name in GATHER_OPS:
        index = sum(_touched_bytes(t) for t in ins if not t.is_floating_point())
        return "copy", index + 2 * sum(_touched_bytes(t) for t in outs)
    if name in SCATTER_OPS:
        target = args[0]
        src = [t for t in ins if t is not target]
        return "copy", sum(_touched_bytes(t) for t in src) + sum(
            _touched_bytes(t) for t in src if t.is_floating_point())
    if written is not None:
        outs = _tensors(written)
    cls = ("copy" if name in COPY_OPS else "reduction" if name in REDUCTION_OPS else "elementwise")
    return cls, sum(_touched_bytes(t) for t in ins) + sum(_touched_bytes(t) for t in outs)


# ---------------------------------------------------------------------------------------------- the tracker


def _is_c10d(func) -> bool:
    return func.namespace in ("c10d", "_c10d_functional", "c10d_functional")


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
#: Where an op's cost is booked (the breakdown by mixer): the layer's mixer letter (A, L, D, G), "MLP", or
#: "embed/loss" (embedding, final norm, output layer, loss and anything outside a decoder layer).
SCOPE_OTHER = "embed/loss"


def _flop_dtype(args) -> str:
    for x in args:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return DTYPE_NAMES.get(x.dtype, "fp32")
    return "fp32"


def detail_key(scope: str, cls: str, dtype: str = "") -> str:
    """Key of one entry of RankSim.flops_detail ("scope|class|dtype") or bytes_detail ("scope|class|")."""
    return f"{scope}|{cls}|{dtype}"


def split_key(key: str) -> tuple[str, str, str]:
    scope, cls, dtype = key.split("|")
    return scope, cls, dtype


class ScopeTracker:
    """Which decoder layer an op belongs to, forward and backward, without keeping anything alive.

    Forward (and a checkpoint's recompute): module hooks on each `layers.i` and its children (scope: its mixer
    letter; `layers.i.mlp`: "MLP") keep a stack. Backward: when a module's forward ends, the autograd nodes it created
    (from its outputs back to its inputs' nodes) are tagged with its scope in their `metadata`; an op dispatched
    in backward takes the tag of the node running it (`torch._C._current_autograd_node()`), an untagged node
    (a custom Function's inner graph, a checkpoint's recompute) the scope of the last tagged one. The
    embedding, final norm, output layer and loss are "embed/loss". (torch's ModuleTracker does this with multi-grad hooks, which kept activations of
    checkpointed blocks alive: +96% peak under full checkpointing in a 4-layer 1B model.)
    """

    KEY = "lctrain_plan_scope"

    def __init__(self, model: torch.nn.Module, mixers: str) -> None:
        self.stack: list[str] = []
        self.handles = []
        self.last = SCOPE_OTHER
        for name, module in model.named_modules():
            parts = name.split(".")
            if parts[0] == "layers" and len(parts) in (2, 3):
                # The layer and its direct children (a checkpoint's recompute runs the children, not the layer).
                self._hook(module, "MLP" if parts[2:] == ["mlp"] else mixers[int(parts[1])])
            elif name and len(parts) == 1 and name != "layers":
                self._hook(module, SCOPE_OTHER)  # embedding, final norm, output layer

    def _hook(self, module: torch.nn.Module, scope: str) -> None:
        inputs: dict[int, set[int]] = {}  # stack depth -> ids of the inputs' nodes (no reference is kept)

        def pre(mod, args):
            self.stack.append(scope)
            inputs[len(self.stack)] = {id(a.grad_fn) for a in args if isinstance(a, torch.Tensor) and a.grad_fn}

        def post(mod, args, out):
            # always_call: also when a checkpoint's recompute stops early inside the module (an exception).
            stop = inputs.pop(len(self.stack), set())
            self.stack.pop()
            todo = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn]
            seen: set[int] = set()
            while todo:
                node = todo.pop()
                if node is None or id(node) in seen or id(node) in stop:
                    continue
                seen.add(id(node))
                node.metadata.setdefault(self.KEY, scope)
                todo += [n for n, _ in node.next_functions]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]

    def scope(self) -> str:
        if self.stack:
            return self.stack[-1]
        node = torch._C._current_autograd_node()
        if node is not None:
            # Untagged nodes (a custom Function's inner graph, a checkpoint's recompute) run inside the
            # backward of the last tagged node: they inherit its scope.
            self.last = node.metadata.get(self.KEY, self.last)
        return self.last

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class StepTracker(TorchDispatchMode):
    """Counts FLOPs (by scope, class and dtype) and memory-bound bytes (by scope and class) of everything
    dispatched inside it. (Memory -- live storages and their peak -- is the rehearsal's MemoryWatcher, run beside
    it by `run_step`: one machinery for the rehearsal and the planner.) `scopes`: a ScopeTracker of the model
    (None: every op is "embed/loss").
    """

    def __init__(self, scopes: ScopeTracker | None = None) -> None:
        super().__init__()
        self.flops: dict[str, float] = defaultdict(float)
        self.flops_detail: dict[str, float] = defaultdict(float)
        self.bytes_detail: dict[str, float] = defaultdict(float)
        self.memory_bytes = 0.0
        self.ops = 0
        self.scopes = scopes

    def scope(self) -> str:
        return self.scopes.scope() if self.scopes is not None else SCOPE_OTHER

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if not _is_c10d(func):
            counted = _flop_formula(func, args, out)
            if counted is not None:
                cls, n = counted
                self.flops[cls] += n
                self.flops_detail[detail_key(self.scope(), cls, _flop_dtype(args))] += n
            else:
                moved = memory_op_bytes(func, args, kwargs, out)
                if moved is not None:
                    self.memory_bytes += moved[1]
                    self.bytes_detail[detail_key(self.scope(), moved[0])] += moved[1]
        return out


# ---------------------------------------------------------------------------------------- communication


class _CommWatch:
    """Collects this rank's collectives: lctrain's through `record_comm`, Megatron's TP all-reduces by wrapping
    torch.distributed while the step runs (calls made from lctrain.parallel.comm are left to its recorder)."""

    _WRAPPED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")

    def __init__(self, tp_group) -> None:
        self.tp_group = tp_group
        self.phase = "fwd"
        self.megatron: list[tuple[str, int, int, str]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        from lctrain.parallel import comm

        originals = {name: getattr(dist, name) for name in self._WRAPPED}

        def wrap(name, fn):
            @functools.wraps(fn)
            def recorded(tensor, *args, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                group = kwargs.get("group")
                if caller != comm.__name__ and group is not None and group is self.tp_group:
                    t = tensor if name == "all_reduce" else args[0]
                    self.megatron.append((name.split("_into")[0].replace("_tensor", ""),
                                          t.numel() * t.element_size(), dist.get_world_size(group),
                                          f"megatron.{self.phase}"))
                return fn(tensor, *args, **kwargs)
            return recorded

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            with comm.record_comm() as rec:
                yield rec
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def _collect_comm(rec, megatron: list[tuple[str, int, int, str]], cp: int) -> list[CommStat]:
    """Aggregate the step's events; lctrain's own collectives in a step are the mixers' SP exchanges, on the CP
    group (any SP method, including ones added later, e.g. lasp2_delta, conv_halo), Megatron's are TP."""
    stats: dict[tuple[str, str, str, int], CommStat] = {}

    def add(group, op, tag, size, nbytes):
        key = (group, op, tag, size)
        if key not in stats:
            stats[key] = CommStat(group, op, tag, size)
        stats[key].calls += 1
        stats[key].bytes += nbytes

    for e in rec.events:
        # A one-rank group moves nothing; the SP methods' object all-gather agrees on input shapes once per
        # signature and process (lctrain.sp.utils.agree_once), so it is not part of a steady-state step.
        if e.group_size < 2 or e.op == "all_gather_object":
            continue
        group = "cp" if e.tag.split(".")[0] in _SP_TAGS or e.group_size == cp else "other"
        add(group, e.op, e.tag, e.group_size, e.bytes)
    for op, nbytes, size, tag in megatron:
        if size < 2:
            continue  # a one-rank group moves nothing
        add("tp", op, tag, size, nbytes)
    return sorted(stats.values(), key=lambda c: (c.group, c.tag, c.op))


# -------------------------------------------------------------------------------------- the fake world
# The fake world (a meta:fake process group of TP x CP ranks, lctrain's mesh, meta tensors dispatched as GPU
# tensors) and the memory watcher are the rehearsal's (lctrain.rehearse.world / .watch): one simulation.


def _worst_cp_rank(spec: SimSpec) -> int:
    if spec.cp_rank is not None:
        if not 0 <= spec.cp_rank < spec.cp:
            raise ValueError(f"cp_rank {spec.cp_rank} out of range for CP={spec.cp}")
        return spec.cp_rank
    if spec.cp_layout != "contiguous":
        return 0
    mixers = spec.model.mixers
    if spec.model.linear_sp == "lasp1" and set(mixers) & set("LDG"):
        # LASP-1's middle ranks receive and send; in backward they also recompute and differentiate the state
        # they passed on (the work each hop of the chain waits for): the critical rank is a middle one, the one
        # with the most causal attention among them.
        if spec.cp >= 3:
            return spec.cp - 2
        if "A" not in mixers:
            return 0
    return spec.cp - 1


@contextlib.contextmanager
def _kernels(kind: str) -> Iterator[None]:
    from lctrain.ops import linear_attention as la

    if kind == "cpu":
        yield
        return
    from lctrain.ops import gated_delta as gd
    from lctrain.ops import gla

    _register_plan_op()
    _register_gated_plan_ops()
    la.register_linear_attention_backend("plan_gpu", _plan_linear_attention, supports=lambda *a: False,
                                         priority=-100)
    gd.register_gated_delta_backend("plan_gpu", _plan_gated_delta, supports=lambda *a: False, priority=-100)
    gla.register_gla_backend("plan_gpu", _plan_gla, supports=lambda *a: False, priority=-100)
    try:
        with la.use_linear_attention_backend("plan_gpu"), gd.use_gated_delta_backend("plan_gpu"), \
                gla.use_gla_backend("plan_gpu"):
            yield
    finally:
        la.REGISTRY.unregister("plan_gpu")
        gd.REGISTRY.unregister("plan_gpu")
        gla.REGISTRY.unregister("plan_gpu")


def run_step(model: torch.nn.Module, spec: SimSpec, mesh, make_tensor,
             device_types: tuple[str, ...] = ("meta", "cuda")) -> tuple[StepTracker, Any, int, Any]:
    """One forward + backward of `model` on this rank's tokens, watched; shared by the simulation (meta tensors)
    and the real gloo run (CPU tensors: `device_types=("cpu",)`).

    `make_tensor(shape, dtype)` creates the inputs. Returns (FLOP/byte tracker, comm recorder with Megatron's
    events in `.megatron`, bytes alive after forward, the rehearsal's MemoryWatcher: `.peak` is the step's peak
    of live storages, parameter gradients dropped as they are produced -- the ZeRO rule counts those).
    """
    from lctrain.parallel.sharding import shard_positions
    from lctrain.rehearse.watch import MemoryWatcher

    b, s_local = spec.micro_batch, spec.seq_len // spec.cp
    input_ids = make_tensor((b, s_local), torch.int64)
    labels = make_tensor((b, s_local), torch.int64)
    pos = shard_positions(spec.seq_len, mesh.cp_rank, spec.cp, spec.cp_layout).to(input_ids.device)
    scopes = ScopeTracker(model, spec.model.mixers)
    tracker = StepTracker(scopes)
    memory = MemoryWatcher(device_types)
    watch = _CommWatch(mesh.tp_group)

    def drop_grad(p: torch.Tensor) -> None:
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(drop_grad) for p in model.parameters() if p.requires_grad]
    try:
        with _kernels(spec.kernels), watch.active() as rec, tracker, memory:  # memory first: its source lines
            out = model(input_ids, pos, labels)
            after_forward = memory.total
            watch.phase = "bwd"
            out.loss_sum.backward()
            del out
    finally:
        for h in hooks:
            h.remove()
        scopes.remove()
    rec.megatron = watch.megatron
    return tracker, rec, after_forward, memory


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def simulate_rank(spec: SimSpec) -> RankSim:
    """Simulate one rank of the job described by `spec` (see the module docstring).

    Raises:
        ValueError: the layout does not fit the model or the sequence (before anything is built).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lctrain.models import build_model
    from lctrain.parallel.mesh import MeshConfig
    from lctrain.rehearse.world import fake_world

    spec.validate()
    spec = replace(spec, model=replace(spec.model, activation_checkpointing=spec.activation_checkpointing))
    t0 = time.perf_counter()
    world = spec.tp * spec.cp
    cp_rank = _worst_cp_rank(spec)
    dtype = _dtype(spec.dtype)
    # Megatron's order tp-cp-dp: TP rank 0 of CP rank cp_rank. kernels="gpu": meta tensors answering as GPU
    # tensors; kernels="cpu": fake CPU tensors on a cpu:fake group, taking the CPU paths a gloo run takes.
    gpu = spec.kernels == "gpu"
    with fake_world(world, cp_rank * spec.tp, MeshConfig(tp=spec.tp, cp=spec.cp, cp_layout=spec.cp_layout),
                    device="meta" if gpu else "cpu") as mesh, \
            (contextlib.nullcontext() if gpu else FakeTensorMode(allow_non_fake_inputs=True)):
        assert mesh.cp_rank == cp_rank and mesh.tp_rank == 0
        with torch.device("meta") if gpu else contextlib.nullcontext():
            model = build_model(spec.model, mesh, spec.cp_layout)
        if dtype != torch.float32:
            # Module.to would swap fake parameters (refused): the trainer's cast, parameter by parameter.
            for p in model.parameters():
                p.data = p.data.to(dtype)
        params = list(model.parameters())
        n_local = sum(p.numel() for p in params)
        n_rep = sum(p.numel() for p in params if not getattr(p, "tensor_model_parallel", False))
        param_bytes = sum(p.numel() * p.element_size() for p in params)

        def make(shape, dt):
            return torch.zeros(shape, dtype=dt, device="meta" if gpu else "cpu")

        tracker, rec, after_fwd, memory = run_step(model, spec, mesh, make,
                                                   ("meta", "cuda") if gpu else ("cpu",))
        comm = _collect_comm(rec, rec.megatron, spec.cp)
    return RankSim(spec=spec, world=world, params_local=n_local, params_tp_replicated=n_rep,
                   param_bytes=param_bytes, activation_peak_bytes=memory.peak,
                   activation_after_forward_bytes=after_fwd, flops=dict(tracker.flops),
                   memory_bound_bytes=tracker.memory_bytes, comm=comm,
                   sim_seconds=time.perf_counter() - t0, ops=tracker.ops,
                   flops_detail=dict(tracker.flops_detail), bytes_detail=dict(tracker.bytes_detail))


def _combine(parts: list[tuple[float, RankSim]], spec: SimSpec, seconds: float) -> RankSim:
    """The linear combination sum_i w_i X_i of simulated records (every field of a record is a sum over layers)."""
    comm: dict[tuple, CommStat] = {}
    for w, sim in parts:
        for c in sim.comm:
            key = (c.group, c.op, c.tag, c.group_size)
            acc = comm.setdefault(key, CommStat(c.group, c.op, c.tag, c.group_size))
            acc.calls += w * c.calls
            acc.bytes += w * c.bytes
    classes = sorted({k for _, sim in parts for k in sim.flops})

    def keys(name: str) -> list[str]:
        return sorted({k for _, sim in parts for k in getattr(sim, name)})

    def lin(get) -> float:
        return sum(w * get(sim) for w, sim in parts)

    stats = [replace(c, calls=int(round(c.calls)), bytes=int(round(c.bytes))) for c in comm.values()
             if round(c.calls) > 0]
    return RankSim(
        spec=spec, world=parts[0][1].world,
        params_local=int(round(lin(lambda r: r.params_local))),
        params_tp_replicated=int(round(lin(lambda r: r.params_tp_replicated))),
        param_bytes=int(round(lin(lambda r: r.param_bytes))),
        activation_peak_bytes=int(round(lin(lambda r: r.activation_peak_bytes))),
        activation_after_forward_bytes=int(round(lin(lambda r: r.activation_after_forward_bytes))),
        flops={c: lin(lambda r, c=c: r.flops.get(c, 0.0)) for c in classes},
        memory_bound_bytes=lin(lambda r: r.memory_bound_bytes),
        comm=sorted(stats, key=lambda c: (c.group, c.tag, c.op)),
        sim_seconds=seconds, ops=sum(sim.ops for _, sim in parts),
        flops_detail={k: lin(lambda r, k=k: r.flops_detail.get(k, 0.0)) for k in keys("flops_detail")},
        bytes_detail={k: lin(lambda r, k=k: r.bytes_detail.get(k, 0.0)) for k in keys("bytes_detail")})


def spec_key(spec: SimSpec) -> str:
    """A hashable, stable key of everything a simulation depends on."""
    import json
    from dataclasses import asdict

    return json.dumps(asdict(spec), sort_keys=True)


def layer_variant(spec: SimSpec, mixer: str, num_layers: int) -> SimSpec:
    """`spec` with a model of `num_layers` layers of one mixer type (the SP methods of the other types reset to
    their defaults, so that variants which cannot differ share a cache key; L, D and G share linear_sp)."""
    cfg = spec.model
    defaults = ModelConfig()
    model = replace(cfg, layer_pattern=mixer, num_layers=num_layers,
                    softmax_sp=cfg.softmax_sp if mixer == "A" else defaults.softmax_sp,
                    linear_sp=cfg.linear_sp if mixer in ("L", "D", "G") else defaults.linear_sp,
                    window_sp=cfg.window_sp if mixer == "W" else defaults.window_sp)
    return replace(spec, model=model)


def simulate_composed(spec: SimSpec, cache: dict | None = None) -> RankSim:
    """`simulate_rank` of the whole model, composed from short models of one layer type each.

    Every record of a step (FLOPs, bytes, calls, parameters) is a sum over layers plus the embedding and the
    output layer, so with X_m(n) the record of an n-layer model of mixer m, one layer of m adds
    D_m = X_m(2) - X_m(1) and the rest is B = X_m(1) - D_m; the model is B + sum_m n_m D_m. The activation peak
    is composed the same way: it is reached when backward starts (every layer's saved tensors alive, plus the
    output layer's), which adds up per layer; tests/plan/test_simulate.py checks it against whole-model
    simulation. `cache` (a dict) keeps the short simulations across calls (a search reuses them).
    """
    cfg = spec.model
    counts: dict[str, int] = {}
    for m in cfg.mixers:
        counts[m] = counts.get(m, 0) + 1
    t0 = time.perf_counter()
    cache = {} if cache is None else cache

    def sim(s: SimSpec) -> RankSim:
        key = spec_key(s)
        if key not in cache:
            cache[key] = simulate_rank(s)
        return cache[key]

    parts: list[tuple[float, RankSim]] = []
    for i, (m, n) in enumerate(sorted(counts.items())):
        one, two = sim(layer_variant(spec, m, 1)), sim(layer_variant(spec, m, 2))
        if i == 0:  # the base (embedding, output layer, loss) once: B = 2 X(1) - X(2)
            parts += [(2.0, one), (-1.0, two)]
        parts += [(float(n), two), (-float(n), one)]
    return _combine(parts, spec, time.perf_counter() - t0)


def model_flops_per_token(cfg: ModelConfig, seq_len: int, doc_len: int | None = None) -> float:
    """The model's training FLOPs per token (lctrain.models.flops), the numerator of MFU."""
    from lctrain.models.flops import flops_per_token

    return flops_per_token(cfg, seq_len, doc_len)


__all__ = ["ACTIVATION_CHECKPOINTING", "CommStat", "RankSim", "SimSpec", "StepTracker", "memory_op_bytes",
           "layer_variant", "lightning_flops_fwd", "model_flops_per_token", "run_step", "simulate_composed",
           "simulate_rank"]
