"""The DeepSpeed engine around the model: ZeRO over DP x CP (never across TP), AdamW, clipping, precision.

DeepSpeed learns the parallel layout from an `mpu` object. Megatron's `parallel_state` would give it the
pure DP group, but the weights are replicated over DP *and* CP, so gradients must be reduced, and ZeRO
must shard, over the DP x CP group. `MeshMPU` answers DeepSpeed's questions with that group as "data
parallel" and the TP group as "model parallel" (it deliberately has no `get_sequence_parallel_*`: those
would switch on DeepSpeed's own Ulysses code paths). DeepSpeed then averages gradients over DP x CP, which
is what `global_token_mean`'s gradient scaling expects.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from lctrain.parallel import comm
from lctrain.parallel.mesh import Mesh
from lctrain.train.config import TrainConfig


class MeshMPU:
    """DeepSpeed's `mpu` interface over the lctrain mesh (data parallel = DP x CP, model parallel = TP)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def get_data_parallel_group(self):
        return self.mesh.dp_cp_group

    def get_data_parallel_rank(self) -> int:
        return comm.group_rank(self.mesh.dp_cp_group)

    def get_data_parallel_world_size(self) -> int:
        return comm.group_size(self.mesh.dp_cp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.mesh.dp_cp_group)

    def get_model_parallel_group(self):
        return self.mesh.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return comm.global_rank(self.mesh.tp_group, 0)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def resolve_dtype(cfg: TrainConfig) -> torch.dtype:
    """bf16 on GPU, float32 on CPU for "auto"."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32


def import_deepspeed():
    """Import DeepSpeed quietly, on the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (embeddings, projections), none on norms, gains and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: TrainConfig, mesh: Mesh, grad_accum: int):
    """Wrap `model` in a DeepSpeed engine (ZeRO stage `cfg.zero_stage`, AdamW, clipping, dtype)."""
    deepspeed = import_deepspeed()
    # DeepSpeed insists on LOCAL_RANK; a single process started without a launcher has none.
    os.environ.setdefault("LOCAL_RANK", "0")
    dtype = resolve_dtype(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=MeshMPU(mesh),
                                           dist_init_required=False)
    return engine


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer."""
    opt = engine.optimizer
    for group in (opt.optimizer if hasattr(opt, "optimizer") else opt).param_groups:
        group["lr"] = lr
