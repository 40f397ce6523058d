"""Layout-independent training state: full fp32 weights and Adam moments per parameter name.

A checkpoint must resume under any (tp, cp, dp) layout and ZeRO stage, so it never stores a rank's
flat ZeRO partition or a TP slice. Saving asks DeepSpeed for each parameter's full fp32 master value
and Adam moments (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, which gather the ZeRO
partitions over the DP x CP group) and then gathers the TP slices along the parameter's
`partition_dim` (Megatron's attributes). Loading cuts the full tensors back into this rank's TP slice,
copies it into the module before the engine is built (so the low-precision copy is right), and then
writes the fp32 master and the moments into the engine's partitions with `safe_set_full_*`.

Names: `model/<param>`, `optim/<param>/exp_avg`, `optim/<param>/exp_avg_sq`, and `optim/step`.
"""
from __future__ import annotations

import torch

from lctrain.parallel.mesh import Mesh

MOMENTS = ("exp_avg", "exp_avg_sq")


def _tp_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def gather_tp(local: torch.Tensor, param: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Full tensor of TP-split `param` from every TP rank's `local` (collective over the TP group)."""
    if mesh.tp == 1 or not _tp_split(param):
        return local
    from lctrain.models.tensor_parallel import gather_full_tensor

    return gather_full_tensor(local, param, mesh.tp_group)


def split_tp(full: torch.Tensor, param: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This TP rank's slice of `full` for `param` (inverse of :func:`gather_tp`; Megatron's strided split)."""
    if mesh.tp == 1 or not _tp_split(param):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    if full.shape[dim] % (mesh.tp * stride):
        raise ValueError(f"a stored tensor of shape {tuple(full.shape)} does not split over tp={mesh.tp} along dim {dim}")
    pieces = full.chunk(mesh.tp * stride, dim=dim)
    return torch.cat([pieces[j * mesh.tp + mesh.tp_rank] for j in range(stride)], dim=dim).contiguous()


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") else opt


def _has_hp(param: torch.Tensor) -> bool:
    """Whether DeepSpeed keeps a separate fp32 master for `param` (ZeRO 1-3, bf16 optimizer)."""
    # A ZeRO-1/2 parameter lying wholly in another rank's partition has `_hp_mapping = None`; it still
    # takes part in the (collective) full gathers, so the attribute's presence is what counts.
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _relink_moments(engine) -> None:
    """Point every parameter's fragment at its group's moments again.

    DeepSpeed's ZeRO-1/2 and bf16 optimizers link the fragments once, right after stepping the FIRST
    parameter group, when the other groups' moments do not exist yet; relinking fixes the later groups.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def full_state(engine, mesh: Mesh, step: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights and Adam moments of every parameter (collective over DP x CP and TP).

    Must be called after at least one optimizer step (the moments exist from then on).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    base = _base_optimizer(engine)
    _relink_moments(engine)
    for name, p in engine.module.named_parameters():
        if _has_hp(p):
            value = safe_get_full_fp32_param(p)
            moments = [safe_get_full_optimizer_state(p, k) for k in MOMENTS]
        else:
            value = p.detach()
            moments = [base.state[p][k] for k in MOMENTS]
        out[f"model/{name}"] = gather_tp(value.float(), p, mesh).cpu().clone()
        for k, m in zip(MOMENTS, moments):
            out[f"optim/{name}/{k}"] = gather_tp(m.float(), p, mesh).cpu().clone()
    out["optim/step"] = torch.tensor(step, dtype=torch.int64)
    return out


def state_names(model: torch.nn.Module) -> list[str]:
    """The names :func:`full_state` produces for `model`."""
    names = []
    for name, _ in model.named_parameters():
        names += [f"model/{name}"] + [f"optim/{name}/{k}" for k in MOMENTS]
    return names + ["optim/step"]


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], mesh: Mesh) -> None:
    """Copy the stored full weights into the module's parameters (this rank's TP slices); before the engine."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = state[f"model/{name}"]
            local = split_tp(full, p, mesh)
            if local.shape != p.shape:
                raise ValueError(f"stored parameter {name!r} has shape {tuple(full.shape)}, which does not fit this "
                                 f"model's {tuple(p.shape)} on tp={mesh.tp} (a different model config?)")
            p.copy_(local.to(p.dtype))


def load_engine_state(engine, state: dict[str, torch.Tensor], mesh: Mesh) -> None:
    """Write fp32 masters, Adam moments and the step count into a freshly built engine's optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt, base = engine.optimizer, _base_optimizer(engine)
    step = float(state["optim/step"])
    # The moments exist only after a first step; create them (zeros) so the setters have somewhere to write.
    flat = getattr(opt, "fp32_partitioned_groups_flat", None)
    owners = flat if flat is not None else [q for g in base.param_groups for q in g["params"]]
    for q in owners:
        base.state[q] = {"step": torch.tensor(step), **{k: torch.zeros_like(q) for k in MOMENTS}}
    _relink_moments(engine)
    for name, p in engine.module.named_parameters():
        value = split_tp(state[f"model/{name}"], p, mesh)
        moments = {k: split_tp(state[f"optim/{name}/{k}"], p, mesh) for k in MOMENTS}
        if _has_hp(p):
            safe_set_full_fp32_param(p, value.to(p.device))
            for k, m in moments.items():
                safe_set_full_optimizer_state(p, m.to(p.device), k)
        else:
            for k, m in moments.items():
                base.state[p][k].copy_(m)
