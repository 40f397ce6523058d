"""Predicted next to published: the planner against three published tables (printed into docs/planner.md).

    python -m lctrain.plan.published            # prints the three Markdown tables (minutes on 2 cores)

1. NVIDIA NeMo, "Long Sequence Performance", Llama-2-7B on DGX-H100 with context parallelism
   (github.com/NVIDIA/NeMo, docs/source/performance/performance_long_sequence.md): TFLOPS per GPU of the
   with-CP layouts (TP, DP, CP; PP=1 rows) from 16K to 1024K tokens.
2. ring-flash-attention README (github.com/zhuzilin/ring-flash-attention): fwd+bwd iterations/s of ring and
   zigzag ring attention on 8 GPUs relative to 1/8 of single-GPU flash-attn on the whole sequence (Llama-3.1-8B
   attention: 32 heads, 8 kv heads, head dim 128; 8K tokens per GPU; bf16).
3. LASP-2 paper (Sun et al. 2025, arXiv 2502.07563, abstract): Linear-Llama3-1B on 64 GPUs at 2048K tokens,
   LASP-2 trains 15.2% faster than LASP-1 (and 36.6% faster than Ring Attention, which lctrain does not run
   on linear layers).

Nothing here changes a constant of hardware.py: the predictions use the device tables as they are.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from lctrain.models.config import ModelConfig
from lctrain.plan.hardware import Hardware, get_hardware
from lctrain.plan.simulate import RankSim, SimSpec, StepTracker, _collect_comm, _CommWatch, _fake_world, \
    release_fake_world
from lctrain.plan.timemodel import estimate_step

LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        ffn_hidden_size=11008, layer_pattern="A", softmax_sp="ring")

#: NeMo's Llama-2-7B with-CP rows (PP=1): seq (K tokens), GPUs, TP, DP, CP, published TFLOPS/GPU (FP8).
NEMO_LLAMA2_7B = [(16, 16, 2, 8, 1, 660), (32, 32, 2, 8, 2, 610), (64, 64, 4, 8, 2, 574), (128, 128, 4, 8, 4, 555),
                  (256, 256, 4, 8, 8, 549), (512, 512, 8, 4, 16, 549), (1024, 1024, 8, 4, 32, 536)]


def nemo_table(hw: Hardware | None = None, activation_checkpointing: str = "selective") -> list[dict]:
    """Predicted model TFLOPS/GPU of the NeMo layouts (our bf16 tables; NeMo ran FP8)."""
    hw = hw or get_hardware("h100")
    from lctrain.plan.search import plan_rows

    rows = []
    for k, gpus, tp, dp, cp, published in NEMO_LLAMA2_7B:
        seq = k * 1024
        spec = SimSpec(LLAMA2_7B, tp=tp, cp=cp, seq_len=seq, activation_checkpointing=activation_checkpointing)
        sim, (row,) = plan_rows(spec, gpus, 8, hw, [1])
        tflops = row.mfu * hw.peak_bf16_flops / 1e12
        rows.append(dict(seq_k=k, gpus=gpus, tp=tp, dp=dp, cp=cp, published_tflops=published,
                         predicted_tflops=tflops, error=tflops / published - 1, mem_gb=row.mem_gb,
                         comm_frac=row.comm_frac))
    return rows


def _sp_call(method: str, cp: int, layout: str, b: int, s_local: int, h: int, hk: int, d: int) -> RankSim:
    """Simulate one fwd+bwd of an SP attention function alone (fake tensors, fake CP group of `cp`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lctrain import sp
    from lctrain.parallel.mesh import MeshConfig, init_mesh

    rank = cp - 1 if layout == "contiguous" else 0
    _fake_world(cp, rank)
    mesh = init_mesh(MeshConfig(cp=cp, cp_layout=layout))
    fn = {"ring": sp.ring_attention, "allgather": sp.allgather_attention, "ulysses": sp.ulysses_attention}[method]
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.zeros(b, s_local, h, d, dtype=torch.bfloat16, requires_grad=True)
        k = torch.zeros(b, s_local, hk, d, dtype=torch.bfloat16, requires_grad=True)
        v = torch.zeros(b, s_local, hk, d, dtype=torch.bfloat16, requires_grad=True)
        tracker, watch = StepTracker(), _CommWatch(mesh.tp_group)
        with watch.active() as rec, tracker:
            o = fn(q, k, v, group=mesh.cp_group, causal=True, layout=layout)
            watch.phase = "bwd"
            o.backward(torch.zeros_like(o))
    release_fake_world()
    dummy = SimSpec(ModelConfig(num_heads=h, num_kv_heads=hk, hidden_size=h * d), cp=cp, cp_layout=layout,
                    seq_len=s_local * cp, micro_batch=b)
    return RankSim(spec=dummy, world=cp, params_local=0, params_tp_replicated=0, param_bytes=0,
                   activation_peak_bytes=tracker.peak, activation_after_forward_bytes=0, flops=dict(tracker.flops),
                   memory_bound_bytes=tracker.memory_bytes, comm=_collect_comm(rec, watch.megatron, cp),
                   sim_seconds=0.0)


def ring_flash_attn_table() -> list[dict]:
    """Predicted fwd+bwd efficiency of ring (contiguous) and zigzag ring vs 1/8 of single-GPU flash attention."""
    h100 = get_hardware("h100")
    devices = {
        "8xH800": replace(h100, name="NVIDIA H800 SXM", intra_node_bytes_per_s=200e9,
                          sources={**h100.sources, "intra_node": "H800 SXM: NVLink 400 GB/s bidirectional"}),
        "8xA100": get_hardware("a100-80g"),
    }
    published = {("8xH800", "ring"): 0.539, ("8xH800", "zigzag"): 0.902, ("8xA100", "ring"): 0.525,
                 ("8xA100", "zigzag"): 0.898}
    b, s_local, h, hk, d, cp = 1, 8192, 32, 8, 128, 8
    sims = {"ring": _sp_call("ring", cp, "contiguous", b, s_local, h, hk, d),
            "zigzag": _sp_call("ring", cp, "zigzag", b, s_local, h, hk, d)}
    full = 4.0 * b * h * d * (s_local * cp) * (s_local * cp + 1) / 2 * 3  # causal fwd + bwd (2x) on one GPU
    rows = []
    for dev, hw in devices.items():
        ideal = full / (hw.peak_bf16_flops * hw.efficiency["attention"]) / cp
        for name, sim in sims.items():
            est = estimate_step(sim, hw, 1, 0, 8)
            eff = ideal / est.step_s
            rows.append(dict(gpu=dev, method=name, published=published[(dev, name)], predicted=eff,
                             error=eff / published[(dev, name)] - 1, compute_s=est.compute_s,
                             comm_exposed_s=est.comm_exposed_s))
    return rows


def lasp2_table(activation_checkpointing: str = "none") -> list[dict]:
    """Predicted LASP-2 / LASP-1 throughput of Linear-Llama3-1B, 64 A100-80G (8 per node), 2048K tokens."""
    from lctrain.config import load_config
    from lctrain.plan.search import plan_rows

    hw = get_hardware("a100-80g")
    base = load_config("configs/linear-llama3-1b.yaml").model
    seq, cp = 2048 * 1024, 64
    out = {}
    for lsp, layout in (("lasp2", "zigzag"), ("lasp2", "contiguous"), ("lasp1", "contiguous")):
        spec = SimSpec(replace(base, linear_sp=lsp), tp=1, cp=cp, cp_layout=layout, seq_len=seq,
                       activation_checkpointing=activation_checkpointing)
        _, (row,) = plan_rows(spec, 64, 8, hw, [1])
        out[f"{lsp} ({layout})"] = row
    rows = [dict(method=m, tokens_per_s=r.tokens_per_s, mem_gb=r.mem_gb, comm_frac=r.comm_frac, step_s=r.step_s,
                 comm_exposed_s=r.comm_exposed_s, compute_s=r.compute_s) for m, r in out.items()]
    for m in ("lasp2 (zigzag)", "lasp2 (contiguous)"):
        ratio = out[m].tokens_per_s / out["lasp1 (contiguous)"].tokens_per_s
        rows.append(dict(method=f"{m} / lasp1", predicted=ratio, published=1.152, error=ratio / 1.152 - 1))
    return rows


def main() -> None:
    print("## ring-flash-attention, fwd+bwd efficiency vs 1/8 of single-GPU flash-attn\n")
    print("| GPUs | method | published | predicted | error | compute s | exposed comm s |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for r in ring_flash_attn_table():
        print(f"| {r['gpu']} | {r['method']} | {100 * r['published']:.1f}% | {100 * r['predicted']:.1f}% "
              f"| {100 * r['error']:+.0f}% | {r['compute_s']:.4f} | {r['comm_exposed_s']:.4f} |")
    print("\n## LASP-2 vs LASP-1, Linear-Llama3-1B, 64 x A100-80G, 2048K tokens\n")
    for r in lasp2_table():
        print(r)
    print("\n## NeMo Llama-2-7B with CP on DGX-H100 (published FP8, predicted bf16)\n")
    print("| seq | GPUs | TP | DP | CP | published TFLOPS/GPU | predicted | error | mem GB | comm % |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in nemo_table():
        print(f"| {r['seq_k']}K | {r['gpus']} | {r['tp']} | {r['dp']} | {r['cp']} | {r['published_tflops']} "
              f"| {r['predicted_tflops']:.0f} | {100 * r['error']:+.0f}% | {r['mem_gb']:.1f} "
              f"| {100 * r['comm_frac']:.1f} |")


if __name__ == "__main__":
    main()
