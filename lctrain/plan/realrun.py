"""The same step as simulate.py, measured on real tensors in a real gloo job (the planner's ground truth on CPU).

    results = run_distributed(measure_rank, tp * cp, spec)      # one dict per rank

Each rank builds the model exactly as the trainer does (seeded, float32 on CPU), runs one forward + backward of
one micro-batch of random tokens inside the same `run_step` the simulation uses -- the same memory watcher (the
rehearsal's, here on CPU storages), the same FLOP/byte tracker, the same comm recorder (lctrain.parallel.comm's, plus Megatron's TP all-reduces) -- and returns what it measured.
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

    tracker, rec, after_fwd, memory = run_step(model, spec, mesh, make, device_types=("cpu",))
    return {"rank": mesh.rank, "cp_rank": mesh.cp_rank, "tp_rank": mesh.tp_rank, "peak": memory.peak,
            "after_forward": after_fwd, "flops": dict(tracker.flops), "memory_bound_bytes": tracker.memory_bytes,
            "comm": [vars(c) for c in _collect_comm(rec, rec.megatron, spec.cp)]}


#: (config, tp, cp, layout, model overrides, checkpointing): the layouts docs/planner.md validates.
VALIDATION_CASES = [
    ("configs/tiny.yaml", 1, 2, "zigzag", {}, "none"),
    ("configs/tiny.yaml", 2, 2, "zigzag", {"softmax_sp": "ring"}, "full"),
    ("configs/tiny.yaml", 1, 4, "contiguous", {"linear_sp": "lasp1", "softmax_sp": "ulysses", "num_heads": 4,
                                               "num_kv_heads": 4}, "none"),
    ("configs/demo.yaml", 1, 2, "zigzag", {}, "none"),
    ("configs/demo.yaml", 2, 2, "zigzag", {}, "selective"),
    ("configs/demo.yaml", 1, 4, "zigzag", {"softmax_sp": "ring"}, "none"),
]


def validation_table(seq: dict[str, int] | None = None, micro_batch: int = 2) -> list[dict]:
    """Every VALIDATION_CASES layout: real gloo run vs simulation, per CP rank with TP rank 0."""
    from lctrain.config import load_config
    from lctrain.plan.simulate import simulate_rank
    from lctrain.testing import run_distributed

    seq = seq or {"configs/tiny.yaml": 64, "configs/demo.yaml": 128}
    rows = []
    for config, tp, cp, layout, over, ac in VALIDATION_CASES:
        model = replace(load_config(config).model, **over)
        spec = SimSpec(model, tp=tp, cp=cp, cp_layout=layout, seq_len=seq[config], micro_batch=micro_batch,
                       dtype="float32", kernels="cpu", activation_checkpointing=ac)
        for r in run_distributed(measure_rank, tp * cp, spec):
            if r["tp_rank"]:
                continue
            sim = simulate_rank(replace(spec, cp_rank=r["cp_rank"]))
            real_comm = {(c["group"], c["tag"], c["op"]): (c["calls"], c["bytes"]) for c in r["comm"]}
            sim_comm = {(c.group, c.tag, c.op): (c.calls, c.bytes) for c in sim.comm}
            methods = f"{model.linear_sp}+{model.softmax_sp}"
            rows.append(dict(config=config, tp=tp, cp=cp, layout=layout, methods=methods,
                             checkpointing=ac, cp_rank=r["cp_rank"],
                             bytes_real=sum(b for _, b in real_comm.values()),
                             bytes_sim=sum(b for _, b in sim_comm.values()),
                             calls_real=sum(c for c, _ in real_comm.values()),
                             calls_sim=sum(c for c, _ in sim_comm.values()), comm_equal=real_comm == sim_comm,
                             peak_real=r["peak"], peak_sim=sim.activation_peak_bytes,
                             mb_real=r["memory_bound_bytes"], mb_sim=sim.memory_bound_bytes,
                             mb_error=sim.memory_bound_bytes / r["memory_bound_bytes"] - 1,
                             peak_error=sim.activation_peak_bytes / r["peak"] - 1))
    return rows


if __name__ == "__main__":
    print("| config | tp x cp | layout | methods | checkpointing | CP rank | calls real / sim | bytes real / sim "
          "| equal | memory-bound MB real / sim | error | peak real KiB | peak sim KiB | error |\n"
          "|---|---|---|---|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for r in validation_table():
        print(f"| {r['config']} | {r['tp']}x{r['cp']} | {r['layout']} | {r['methods']} | {r['checkpointing']} "
              f"| {r['cp_rank']} | {r['calls_real']} / {r['calls_sim']} | {r['bytes_real']} / {r['bytes_sim']} "
              f"| {'yes' if r['comm_equal'] else 'NO'} | {r['mb_real'] / 1e6:.3f} / {r['mb_sim'] / 1e6:.3f} "
              f"| {100 * r['mb_error']:+.2f}% | {r['peak_real'] / 1024:.1f} | {r['peak_sim'] / 1024:.1f} "
              f"| {100 * r['peak_error']:+.1f}% |")
