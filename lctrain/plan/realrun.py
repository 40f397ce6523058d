"""The same step as simulate.py, measured on real tensors in a real gloo job (the planner's ground truth on CPU).

    results = run_distributed(measure_rank, tp * cp, spec)      # one dict per rank

Each rank builds the model exactly as the trainer does (seeded, float32 on CPU), runs one forward + backward of
one micro-batch of random tokens inside the same `run_step` the simulation uses -- the same storage tracker, the
same comm recorder (lctrain.parallel.comm's, plus Megatron's TP all-reduces) -- and returns what it measured.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from lctrain.plan.simulate import SimSpec, _collect_comm, run_step


def measure_rank(spec: SimSpec, seed: int = 1234) -> dict:
    """Run one real step of `spec` on this rank of an initialised gloo world of size tp * cp."""
    from lctrain.models import build_model
    from lctrain.parallel.mesh import MeshConfig, init_mesh

    spec = replace(spec, model=replace(spec.model, activation_checkpointing=spec.activation_checkpointing))
    mesh = init_mesh(MeshConfig(tp=spec.tp, cp=spec.cp, cp_layout=spec.cp_layout))
    torch.manual_seed(seed)
    model = build_model(spec.model, mesh, spec.cp_layout)
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[spec.dtype]
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed + mesh.rank)

    def make(shape, dt):
        return torch.randint(0, spec.model.vocab_size, shape, generator=gen, dtype=dt)

    tracker, rec, after_fwd = run_step(model, spec, mesh, make)
    return {"rank": mesh.rank, "cp_rank": mesh.cp_rank, "tp_rank": mesh.tp_rank, "peak": tracker.peak,
            "after_forward": after_fwd, "flops": dict(tracker.flops), "memory_bound_bytes": tracker.memory_bytes,
            "comm": [vars(c) for c in _collect_comm(rec, rec.megatron)]}
