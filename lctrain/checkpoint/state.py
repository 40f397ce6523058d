"""Sharded, layout-independent training state: every rank names the pieces of each global tensor it owns.

Stored tensors (global, i.e. un-TP-split shapes; a >2-D parameter is stored as `[d0, prod(rest)]`):
`model/<param>` (fp32 master), `optim/<param>/exp_avg`, `optim/<param>/exp_avg_sq`, `optim/step`.

What a rank owns of parameter p: the elements of its TP slice that lie in its ZeRO partition, a flat range
[a, b) of the TP-local tensor:

- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fragment DeepSpeed maps to this rank (`p._hp_mapping`,
  `lp_fragment_address`); the data are the fp32 master and moment fragments (`hp_fragment`,
  `get_optim_state_fragment`), views into DeepSpeed's flat partitions.
- ZeRO-3: `[r * part, (r + 1) * part)` of the flat parameter, r = rank in DP x CP, part = `ds_tensor.ds_numel`;
  the data are views of the optimizer's fp32 partition and moments.
- no ZeRO (fp32, stage 0): replicated, so for saving the tensor is cut evenly over DP x CP (each element
  written once); for loading every rank reads all of it.
TP-replicated parameters (norms) are saved by TP rank 0 only and loaded by every TP rank.

A flat range of a row-major `[R, C]` tensor is a partial row, blocks of whole rows (capped at MAX_BOX_ELEMS so a
save's staging copy stays small) and a partial row; cut at Megatron's strided TP pieces each box maps to one box
of the global tensor. Box data are strided views
(`as_strided`) into DeepSpeed's own buffers, so building the state dict allocates nothing: a save stages one box
at a time (DCP copies a view before writing it) and a load writes straight into the masters and moments, which
DCP's planner fills from whatever boxes another layout saved (resharding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from lctrain.parallel import comm
from lctrain.parallel.mesh import Mesh

MOMENTS = ("exp_avg", "exp_avg_sq")


class Shards:
    """The boxes of one global tensor that this rank holds: DCP's checkpointable protocol (as DTensor's).

    Args:
        shape: the global tensor's shape.
        dtype: its dtype.
        boxes: (global offsets, tensor of the box's shape) pairs; disjoint.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, boxes: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.shape, self.dtype, self.boxes = torch.Size(shape), dtype, boxes

    def size(self) -> torch.Size:
        return self.shape

    def nbytes(self) -> int:
        """Bytes of this rank's boxes."""
        return sum(t.numel() * t.element_size() for _, t in self.boxes)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(off)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(off), t.shape),
                                                      properties=props, size=self.shape))
                for off, t in self.boxes]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(off), t.shape) for off, t in self.boxes]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for off, t in self.boxes:
            if torch.Size(off) == index.offset:
                return t
        raise ValueError(f"{index.fqn}: this rank holds no box at {index.offset}")


def _lookup(state_dict: dict, index: MetadataIndex, fallback) -> Any:
    obj = state_dict.get(index.fqn)
    if isinstance(obj, Shards):
        return obj.__get_tensor_shard__(index)
    return fallback(index)


class ShardsSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, able to look up the boxes of a :class:`Shards`."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        return _lookup(self.state_dict, index, super().lookup_object)


class ShardsLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, writing into the boxes of a :class:`Shards`."""

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # DCP's set-up rewrites values it does not know (meta-device initialisation); keep the Shards aside.
        shards = {k: v for k, v in state_dict.items() if isinstance(v, Shards)}
        super().set_up_planner({k: v for k, v in state_dict.items() if k not in shards}, metadata, is_coordinator)
        self.state_dict.update(shards)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _lookup(self.state_dict, index, super().lookup_tensor)


@dataclass
class _Layout:
    """How parameter p's TP-local tensor, seen as `[rows, cols]`, sits in the stored global tensor."""

    rows: int
    cols: int
    global_shape: tuple[int, ...]
    pieces: list[tuple[int, int, int, int]]
    """(axis, local start, local end, global start): TP pieces along axis 0 (rows) or 1 (cols)."""


def _tp_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _local_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _layout(p: torch.Tensor, mesh: Mesh, name: str) -> _Layout:
    shape = _local_shape(p)
    split = mesh.tp > 1 and _tp_split(p)
    dim = p.partition_dim if split else 0
    stride = getattr(p, "partition_stride", 1) if split else 1
    if len(shape) > 2 and dim != 0:
        raise ValueError(f"parameter {name!r} of shape {shape} is split over TP along dim {dim}; checkpoints "
                         "support >2-D parameters only when split along dim 0")
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    full = list(shape) if len(shape) <= 2 else [rows, cols]
    axis_len = rows if dim == 0 else cols
    if split:
        full[dim] *= mesh.tp
        if axis_len % stride:
            raise ValueError(f"parameter {name!r}: local size {axis_len} along dim {dim} is not divisible by "
                             f"its TP stride {stride}")
        n = axis_len // stride
        pieces = [(dim, j * n, (j + 1) * n, (j * mesh.tp + mesh.tp_rank) * n) for j in range(stride)]
    else:
        pieces = [(0, 0, rows, 0)]
    return _Layout(rows, cols, tuple(full), pieces)


#: Largest box in elements (16 MiB of fp32): DCP stages one box at a time, so this bounds a save's staging copy.
MAX_BOX_ELEMS = 1 << 22


def _row_boxes(a: int, b: int, cols: int, max_elems: int = MAX_BOX_ELEMS) -> list[tuple[int, int, int, int]]:
    """The flat range [a, b) of a row-major `[*, cols]` tensor as (row, col, height, width) boxes: a partial
    row, blocks of whole rows (at most `max_elems` elements each, or one row), a partial row."""
    if a >= b:
        return []
    r0, c0 = divmod(a, cols)
    r1, c1 = divmod(b, cols)  # exclusive end: row r1, column c1
    if r0 == r1:
        return [(r0, c0, 1, c1 - c0)]
    out = []
    if c0:
        out.append((r0, c0, 1, cols - c0))
        r0 += 1
    step = max(1, max_elems // cols)
    for r in range(r0, r1, step):
        out.append((r, 0, min(step, r1 - r), cols))
    if c1:
        out.append((r1, 0, 1, c1))
    return out


Boxes = list[tuple[tuple[int, ...], torch.Tensor]]


def owned_boxes(lay: _Layout, a: int, b: int, bufs: list[torch.Tensor]) -> list[Boxes]:
    """Global boxes of the local flat range [a, b) with views into each 1-D buffer of `bufs` (one list per buffer).

    Each buffer holds the elements [a, b) of the TP-local tensor, contiguous.
    """
    out: list[Boxes] = [[] for _ in bufs]
    for r, c, h, w in _row_boxes(a, b, lay.cols):
        for axis, lo, hi, g in lay.pieces:
            start, stop = (r, r + h) if axis == 0 else (c, c + w)
            lo_, hi_ = max(start, lo), min(stop, hi)
            if lo_ >= hi_:
                continue
            rr, hh, cc, ww = (lo_, hi_ - lo_, c, w) if axis == 0 else (r, h, lo_, hi_ - lo_)
            grow, gcol = (g + rr - lo, cc) if axis == 0 else (rr, g + cc - lo)
            offsets = (grow,) if len(lay.global_shape) == 1 else (grow, gcol)
            for i, buf in enumerate(bufs):
                shape, strides = ((hh,), (lay.cols,)) if len(lay.global_shape) == 1 else ((hh, ww), (lay.cols, 1))
                view = buf.as_strided(shape, strides, buf.storage_offset() + rr * lay.cols + cc - a)
                out[i].append((offsets, view))
    return out


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def _relink_moments(engine) -> None:
    """Point every parameter's fragment at its group's moments again.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers link the fragments once, right after stepping the FIRST
    parameter group, when the other groups' moments do not exist yet; relinking fixes the later groups.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _zero3_partition(opt, p: torch.Tensor, key: str | None) -> torch.Tensor:
    """View of ZeRO-3's fp32 partition (key None) or moment `key` of `p` (DeepSpeed's own narrow view)."""
    view, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    return view


def _owned(engine, p: torch.Tensor, mesh: Mesh, for_load: bool) -> tuple[int, int, list[torch.Tensor]]:
    """(a, b, [master, exp_avg, exp_avg_sq] 1-D buffers of the local flat range [a, b)) of `p` on this rank."""
    opt, base = engine.optimizer, _base_optimizer(engine)
    if hasattr(p, "ds_id"):  # ZeRO-3
        part = p.ds_tensor.ds_numel
        a = comm.group_rank(mesh.dp_cp_group) * part
        b = min(a + part, p.ds_numel)
        if a >= b:
            return 0, 0, []
        return a, b, [_zero3_partition(opt, p, k)[: b - a] for k in (None, *MOMENTS)]
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer
        m = p._hp_mapping
        if m is None:
            return 0, 0, []
        a = m.lp_fragment_address.start
        return a, a + m.lp_fragment_address.numel, [m.hp_fragment] + [m.get_optim_state_fragment(k) for k in MOMENTS]
    n = p.numel()
    a, b = 0, n
    if not for_load:
        size, rank = comm.group_size(mesh.dp_cp_group), comm.group_rank(mesh.dp_cp_group)
        a, b = n * rank // size, n * (rank + 1) // size
    return a, b, [t.detach().view(-1)[a:b] for t in (p, base.state[p]["exp_avg"], base.state[p]["exp_avg_sq"])]


def sharded_state(engine, mesh: Mesh, step: int, for_load: bool = False) -> dict[str, Any]:
    """This rank's share of the training state as DCP state dict entries (views; nothing is copied).

    Must be called after the optimizer state exists (after a step, or :func:`prepare_load`).

    Args:
        engine: the DeepSpeed engine.
        mesh: the lctrain mesh.
        step: the optimizer step count stored as `optim/step`.
        for_load: the destinations of a load (replicated tensors in full) rather than what to save.
    """
    _relink_moments(engine)
    out: dict[str, Any] = {}
    for name, p in engine.module.named_parameters():
        lay = _layout(p, mesh, name)
        keep = for_load or not (mesh.tp > 1 and not _tp_split(p) and mesh.tp_rank != 0)
        a, b, bufs = _owned(engine, p, mesh, for_load) if keep else (0, 0, [])
        boxes = owned_boxes(lay, a, b, bufs) if bufs else [[], [], []]
        for key, bx in zip((f"model/{name}", *(f"optim/{name}/{k}" for k in MOMENTS)), boxes):
            out[key] = Shards(lay.global_shape, torch.float32, bx)
    out["optim/step"] = torch.tensor(step, dtype=torch.int64)
    return out


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of this rank's share (the boxes of every :class:`Shards` plus plain tensors)."""
    return sum(v.nbytes() if isinstance(v, Shards) else v.numel() * v.element_size() for v in state.values())


def prepare_load(engine, step: int) -> None:
    """Create the optimizer's moments (zeros) and step counts in a freshly built engine, so loads have targets."""
    opt, base = engine.optimizer, _base_optimizer(engine)
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    owners = flat if flat is not None else [q for g in base.param_groups for q in g["params"]]
    for q in owners:
        base.state[q] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(q) for k in MOMENTS}}


def finish_load(engine) -> None:
    """Copy the loaded fp32 masters into the module's (low-precision) parameters on every rank."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16 optimizer: own partition, then all-gather over DP
        opt.update_lp_params()
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: each parameter's own partition (ds_tensor)
        # As DeepSpeed's own load: release the persistent (small, always gathered) parameters, write every
        # partition, then re-gather the persistent ones.
        if opt.persistent_parameters:
            opt.persistent_parameters[0].partition(opt.persistent_parameters)
        for p in engine.module.parameters():
            if hasattr(p, "ds_id") and p.requires_grad:
                p.ds_tensor.data.copy_(_zero3_partition(opt, p, None).view_as(p.ds_tensor))
        opt.checkpoint_event_epilogue()
