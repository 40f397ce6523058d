"""Megatron-core tensor-parallel plumbing shared by the model's layers.

Weights are always initialised the way Megatron's CPU path does it: every TP rank draws the FULL
("master") matrix from torch's RNG, in the same order, and keeps its own slice. So for one seed the full
weights are identical whatever the TP size, and a TP x CP x DP model equals the single-process model.
(Megatron's GPU path draws only the local slice from a per-TP-rank RNG, which breaks that; the model is
built on the CPU and moved to the device afterwards.)

Every TP-split parameter carries Megatron's attributes `tensor_model_parallel`, `partition_dim` and
`partition_stride`; :func:`gather_full_parameters` uses them to rebuild the full tensors.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from lctrain.parallel import comm


def megatron_config(tp: int, cp: int) -> ModelParallelConfig:
    """The ModelParallelConfig of the model's layers: CPU (master-weight) init, float32 parameters."""
    return ModelParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                               use_cpu_initialization=True, perform_initialization=True,
                               params_dtype=torch.float32, sequence_parallel=False)


def normal_init(std: float) -> Callable[[torch.Tensor], None]:
    """In-place N(0, std^2) init (drawn from torch's default generator)."""
    def init(t: torch.Tensor) -> None:
        torch.nn.init.normal_(t, mean=0.0, std=std)
    return init


def scaled_init(std: float, num_layers: int) -> Callable[[torch.Tensor], None]:
    """Init of the projections that write into the residual stream: std / sqrt(2 * num_layers)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def mark_tp_split(param: torch.nn.Parameter, dim: int = 0) -> torch.nn.Parameter:
    """Tag a parameter this module split over TP itself (contiguously along `dim`)."""
    set_tensor_model_parallel_attributes(param, True, dim, 1)
    return param


def is_tp_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_full_tensor(local: torch.Tensor, param: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Rebuild the full tensor of TP-split `param` from every rank's `local` (e.g. its value or its grad).

    Megatron's split with stride k cuts the full tensor into k * tp pieces along `partition_dim` and gives
    rank r the pieces r, r + tp, ...; this inverts it (one all-gather over `tp_group`).
    """
    tp = comm.group_size(tp_group)
    if tp == 1 or not is_tp_split(param):
        return local
    dim, stride = param.partition_dim, param.partition_stride
    shards = comm.all_gather(local.contiguous(), group=tp_group, dim=dim).chunk(tp, dim=dim)  # rank-major
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp)], dim=dim)


def gather_full_parameters(model: torch.nn.Module, tp_group: dist.ProcessGroup | None,
                           grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (un-split) parameters, or their gradients with `grads=True`, by name; collective over `tp_group`.

    Parameters replicated over TP are returned as they are. Missing gradients come back as zeros.
    """
    out = {}
    for name, p in model.named_parameters():
        t = p.detach() if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))
        out[name] = gather_full_tensor(t, p, tp_group)
    return out
