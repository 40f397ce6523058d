"""The predicted-memory check that runs before any hardware is reserved (`lctrain.preflight`).

Fast by construction: the parameter, gradient and optimizer bytes per GPU follow from the model's shapes and
the ZeRO stage (timemodel.zero_state_bytes); the activation peak is the planner's simulation of exactly this
job when one is in the cache (`lctrain plan` with the same config, sequence and layout leaves it there),
otherwise the lower bound every checkpointing mode keeps (the block inputs). So the check never passes a job
the bound already rules out, and says which of the two it used.
"""
from __future__ import annotations

from lctrain.config import Config


def predicted_memory(cfg: Config, world_size: int, hardware: str) -> tuple[float, float, str]:
    """(predicted bytes per GPU, device bytes, how the activations were obtained) for `cfg` on `world_size` GPUs.

    Raises:
        ValueError: unknown hardware, or a layout that does not divide (the other preflight checks say why).
    """
    from lctrain.models.flops import num_parameters
    from lctrain.plan.hardware import get_hardware
    from lctrain.plan.search import SimCache, memory_lower_bound
    from lctrain.plan.simulate import SimSpec, layer_variant, simulate_composed, spec_key
    from lctrain.plan.timemodel import zero_state_bytes

    hw = get_hardware(hardware)
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    dp = cfg.parallel.validate(world_size)
    model, seq, mb = cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size
    spec = SimSpec(model, tp=tp, cp=cp, cp_layout=cfg.parallel.cp_layout, seq_len=seq, micro_batch=mb,
                   activation_checkpointing=model.activation_checkpointing)
    cache = SimCache()
    keys = [spec_key(layer_variant(spec, m, n)) for m in set(model.mixers) for n in (1, 2)]
    if all(k in cache for k in keys):
        sim = simulate_composed(spec, cache)
        total = zero_state_bytes(sim.params_local, cfg.train.zero_stage, cp * dp) + sim.activation_peak_bytes
        how = "simulated activation peak (cached lctrain plan)"
    else:
        states = zero_state_bytes(num_parameters(model) // tp, cfg.train.zero_stage, cp * dp)
        total = states + memory_lower_bound(model, tp, cp, dp, seq, mb) - zero_state_bytes(
            num_parameters(model) // tp, 3, cp * dp)
        how = "lower bound: states + block inputs (run `lctrain plan` on this config for the simulated peak)"
    return total, hw.memory_gb * 1e9, how


def memory_problems(cfg: Config, world_size: int, hardware: str | None) -> list[str]:
    """[] when the job is predicted to fit `hardware` (or no hardware is known), else one problem line."""
    if not hardware:
        return []
    try:
        need, have, how = predicted_memory(cfg, world_size, hardware)
    except ValueError as err:
        msg = str(err)
        return [msg] if "unknown hardware" in msg else []  # layout problems are reported by their own checks
    if need <= have:
        return []
    return [f"predicted memory per GPU {need / 1e9:.1f} GB exceeds the {hardware} device's {have / 1e9:.0f} GB "
            f"({how}); see `lctrain plan CONFIG --gpus {world_size} --hardware {hardware} --search` for layouts "
            "that fit (higher ZeRO stage, activation checkpointing, more CP)"]
