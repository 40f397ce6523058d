"""The DeepSpeed engine around the model: ZeRO over DP x CP (never across TP), AdamW, clipping, precision.

DeepSpeed learns the parallel layout from an `mpu` object. Megatron's `parallel_state` would give it the
pure DP group, but the weights are replicated over DP *and* CP, so gradients must be reduced, and ZeRO
must shard, over the DP x CP group. `MeshMPU` answers DeepSpeed's questions with that group as "data
parallel" and the TP group as "model parallel" (it deliberately has no `get_sequence_parallel_*`: those
would switch on DeepSpeed's own Ulysses code paths). DeepSpeed then averages gradients over DP x CP, which
is what `global_token_mean`'s gradient scaling expects.

Precision: with train.dtype bf16 (the GPU default) DeepSpeed keeps the module in bf16 and fp32 master weights
and Adam moments in its optimizer (its bf16 optimizer, or ZeRO's fp32 partitions); on CPU everything is fp32.
ZeRO-3 builds the model inside `deepspeed.zero.Init`, so each module's parameters are partitioned over DP x CP
as soon as the module exists and no rank ever holds the whole model. A tied output layer reads the embedding's
weight outside the embedding's forward, so it is registered with ZeRO-3 as an external parameter of the output
layer (gathered for its forward and backward). `train.deepspeed` is merged into the DeepSpeed config last
(overlap_comm, bucket sizes, CPU offload ...); keys lctrain sets itself are refused.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable

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


#: DeepSpeed config keys lctrain derives from its own settings (train.deepspeed may not set them).
OWNED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "zero_allow_untested_optimizer"}
OWNED_ZERO_KEYS = {"stage"}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: TrainConfig, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: lctrain's settings, then `cfg.deepspeed` merged in (validated).

    Raises:
        ValueError: `cfg.deepspeed` sets a key lctrain owns, or DeepSpeed rejects the merged config.
    """
    extra = cfg.deepspeed or {}
    clash = sorted(OWNED_KEYS & set(extra)) + [f"zero_optimization.{k}" for k in
                                               sorted(OWNED_ZERO_KEYS & set(extra.get("zero_optimization") or {}))]
    if clash:
        raise ValueError(f"train.deepspeed sets {clash}, which lctrain derives itself (use train.micro_batch_size, "
                         "train.global_batch_size, train.grad_clip, train.zero_stage, train.dtype, train.lr ...)")
    dtype = resolve_dtype(cfg)
    if dtype == torch.bfloat16 and cfg.zero_stage == 0:
        # DeepSpeed 0.19 runs bf16 without ZeRO through FP16_UnfusedOptimizer, whose fp32 masters are not the
        # optimizer's parameters; the sharded checkpoints need ZeRO's (or the bf16 optimizer's) fragments.
        raise ValueError("bf16 training needs train.zero_stage >= 1 (fp32 master weights in ZeRO partitions); "
                         "set train.zero_stage=1 or train.dtype=float32")
    ds_config = _merge({
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }, extra)
    if extra:
        import_deepspeed()
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        try:  # DeepSpeed's own (pydantic) validation of the ZeRO section: unknown keys, bad values
            DeepSpeedZeroConfig(**ds_config["zero_optimization"])
        except Exception as err:  # noqa: BLE001 - pydantic's ValidationError and friends
            raise ValueError(f"train.deepspeed.zero_optimization is not a valid DeepSpeed ZeRO config: {err}") from err
    return ds_config


def build_engine(model_fn: Callable[[], torch.nn.Module], cfg: TrainConfig, mesh: Mesh, grad_accum: int,
                 device: torch.device | None = None):
    """Build the model with `model_fn` and wrap it in a DeepSpeed engine (ZeRO, AdamW, clipping, dtype).

    Under ZeRO-3 the model is built inside `deepspeed.zero.Init` (partitioned as it is built).

    Returns:
        (model, engine).
    """
    deepspeed = import_deepspeed()
    # DeepSpeed insists on LOCAL_RANK; a single process started without a launcher has none.
    os.environ.setdefault("LOCAL_RANK", "0")
    ds_config = deepspeed_config(cfg, grad_accum)
    mpu = MeshMPU(mesh)
    if cfg.zero_stage == 3:
        # No dtype= here: zero.Init then takes it from the config (fp32, or bf16); an explicit dtype is ignored
        # in favour of bf16 on a CPU accelerator (an operator-precedence slip in DeepSpeed 0.19's _set_dtype).
        with deepspeed.zero.Init(data_parallel_group=mesh.dp_cp_group, config_dict_or_path=ds_config, mpu=mpu):
            model = model_fn()
        for user, param in getattr(model, "shared_parameters", lambda: [])():
            deepspeed.zero.register_external_parameter(user, param)
    else:
        model = model_fn()
    if device is not None:
        model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
                                           dist_init_required=False)
    return model, engine


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer."""
    opt = engine.optimizer
    for group in (opt.optimizer if hasattr(opt, "optimizer") else opt).param_groups:
        group["lr"] = lr
