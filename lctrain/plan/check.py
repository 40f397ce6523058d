"""The predicted-memory check that runs before any hardware is reserved (`lctrain.preflight`).

It predicts exactly this job's memory per GPU: the parameter, gradient and optimizer bytes per GPU from the
model's shapes and the ZeRO stage (timemodel.zero_state_bytes), the activation peak of the simulated step
(the planner's composed simulation: from the cache when `lctrain plan` left it there, else simulated now --
1- and 2-layer models of each mixer type, seconds for small configs, tens of seconds at 1M tokens), and the
device's OOM margin (allocator fragmentation + reserve, hardware.py). A job passes only when all of it fits.
A job whose lower bound (states + the block inputs every checkpointing mode keeps + the reserve) is already
over the device is refused at once, without simulating it.
"""
from __future__ import annotations

from lctrain.config import Config


def predicted_memory(cfg: Config, world_size: int, hardware: str) -> tuple[float, float, str]:
    """(predicted bytes per GPU, device bytes, how the activations were obtained) for `cfg` on `world_size` GPUs.

    Raises:
        ValueError: unknown hardware, or a layout that does not divide (the other preflight checks say why).
    """
    from lctrain.plan.hardware import get_hardware
    from lctrain.plan.search import SimCache
    from lctrain.plan.simulate import SimSpec, layer_variant, simulate_composed, spec_key
    from lctrain.plan.timemodel import zero_state_bytes

    hw = get_hardware(hardware)
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    dp = cfg.parallel.validate(world_size)
    model, seq, mb = cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size
    spec = SimSpec(model, tp=tp, cp=cp, cp_layout=cfg.parallel.cp_layout, seq_len=seq, micro_batch=mb,
                   activation_checkpointing=model.activation_checkpointing)
    spec.validate()
    # A job whose lower bound (its ZeRO states + the block inputs every checkpointing mode keeps + the reserve)
    # already exceeds the device is refused without simulating it.
    from lctrain.models.flops import num_parameters
    from lctrain.plan.search import memory_lower_bound

    psi = num_parameters(model) // tp
    bound = (zero_state_bytes(psi, cfg.train.zero_stage, cp * dp) + memory_lower_bound(model, tp, cp, dp, seq, mb)
             - zero_state_bytes(psi, 3, cp * dp) + hw.memory_reserve_gb * 1e9)
    if bound > hw.memory_gb * 1e9:
        return bound, hw.memory_gb * 1e9, ("lower bound: states + block inputs + reserve, already over the "
                                           "device; not simulated")
    cache = SimCache()
    keys = [spec_key(layer_variant(spec, m, n)) for m in set(model.mixers) for n in (1, 2)]
    cached = all(k in cache for k in keys)
    sim = simulate_composed(spec, cache)
    states = zero_state_bytes(sim.params_local, cfg.train.zero_stage, cp * dp)
    if cfg.train.zero_stage == 3:
        states += 2 * 2 * sim.params_local / max(1, model.num_layers)
    act = sim.activation_peak_bytes
    margin = hw.fragmentation * act + hw.memory_reserve_gb * 1e9
    how = (f"states {states / 1e9:.1f} GB + simulated activation peak {act / 1e9:.1f} GB + OOM margin "
           f"{margin / 1e9:.1f} GB ({'cached lctrain plan' if cached else 'simulated now'})")
    return states + act + margin, hw.memory_gb * 1e9, how


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
