"""Predicted next to published: the planner against three published tables (printed into docs/planner.md).

    python -m lctrain.plan.published                          # prints the three comparisons (Markdown)
    python -m lctrain.plan.published --write docs/planner.md  # regenerates them in the page (between markers)

tests/plan/test_published.py fails when the page and this code disagree.

1. NVIDIA NeMo, "Long Sequence Performance", Llama-2-7B on DGX-H100 with context parallelism
   (github.com/NVIDIA/NeMo, docs/source/performance/performance_long_sequence.md): TFLOPS per GPU of the
   with-CP layouts (TP, DP, CP; PP=1 rows) from 16K to 1024K tokens.
2. ring-flash-attention README (github.com/zhuzilin/ring-flash-attention): fwd+bwd iterations/s of ring and
   zigzag ring attention on 8 GPUs relative to 1/8 of single-GPU flash-attn on the whole sequence (Llama-3.1-8B
   attention: 32 heads, 8 kv heads, head dim 128; 8K tokens per GPU; bf16).
3. LASP-2 paper (Sun et al. 2025, arXiv 2502.07563, abstract): Linear-Llama3-1B on 64 GPUs at 2048K tokens,
   LASP-2 trains 15.2% faster than LASP-1 (and 36.6% faster than Ring Attention, which lctrain does not run
   on linear layers).

Nothing here changes a constant of hardware.py: the predictions use the device tables as they are (one
efficiency table per device, the same for every method and every comparison). Where a prediction misses by
more than 10 points (ratios) or 25% (absolute), the table carries the model's own terms that explain it, each
computed here (a FLOP convention, a what-if on one term), not guessed.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from lctrain.models.config import ModelConfig
from lctrain.plan.hardware import Hardware, get_hardware
from lctrain.plan.simulate import RankSim, SimSpec, StepTracker, _collect_comm, _CommWatch
from lctrain.plan.timemodel import estimate_step

LLAMA2_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        ffn_hidden_size=11008, layer_pattern="A", softmax_sp="ring")

#: NeMo's Llama-2-7B with-CP rows (PP=1): seq (K tokens), GPUs, TP, DP, CP, published TFLOPS/GPU (FP8).
NEMO_LLAMA2_7B = [(16, 16, 2, 8, 1, 660), (32, 32, 2, 8, 2, 610), (64, 64, 4, 8, 2, 574), (128, 128, 4, 8, 4, 555),
                  (256, 256, 4, 8, 8, 549), (512, 512, 8, 4, 16, 549), (1024, 1024, 8, 4, 32, 536)]


#: H100 SXM FP8 dense tensor-core peak (datasheet: 1,979 TFLOPS), for the what-if "NeMo's GEMMs in FP8".
H100_FP8_FLOPS = 1979e12
BEGIN, END = "<!-- published:begin (python -m lctrain.plan.published --write docs/planner.md) -->", \
    "<!-- published:end -->"


def _fresh_cache():
    from lctrain.plan.search import SimCache

    return SimCache(None)


def nemo_table(hw: Hardware | None = None, activation_checkpointing: str = "selective", cache=None) -> list[dict]:
    """Predicted model TFLOPS/GPU of the NeMo layouts (bf16 tables), and two terms measured on each prediction:
    NeMo's FLOP convention (Megatron's formula counts causal attention as full, i.e. the attention term x2) and
    the step with FP8 GEMMs (the matmul time x bf16 peak / FP8 peak; NeMo ran FP8)."""
    from lctrain.models.flops import flops_per_token, mixing_flops
    from lctrain.plan.search import plan_rows

    hw = hw or get_hardware("h100")
    cache = cache or _fresh_cache()
    rows = []
    for k, gpus, tp, dp, cp, published in NEMO_LLAMA2_7B:
        seq = k * 1024
        spec = SimSpec(LLAMA2_7B, tp=tp, cp=cp, seq_len=seq, activation_checkpointing=activation_checkpointing)
        sim, (row,) = plan_rows(spec, gpus, 8, hw, [1], cache)
        tflops = row.mfu * hw.peak_bf16_flops / 1e12
        ours = flops_per_token(LLAMA2_7B, seq)
        full_causal = ours + 3 * LLAMA2_7B.num_layers * mixing_flops(LLAMA2_7B, "A", seq)
        convention = full_causal / ours
        fp8_step = row.step_s - row.compute_by_class_s.get("matmul", 0.0) * (1 - hw.peak_bf16_flops / H100_FP8_FLOPS)
        both = tflops * convention * row.step_s / fp8_step
        fused_step = fp8_step - row.memory_bound_s
        fused = tflops * convention * row.step_s / fused_step
        rows.append(dict(seq_k=k, gpus=gpus, tp=tp, dp=dp, cp=cp, published_tflops=published,
                         predicted_tflops=tflops, error=tflops / published - 1, convention=convention,
                         nemo_convention_tflops=tflops * convention, fp8_and_convention_tflops=both,
                         residual_error=both / published - 1, fused_tflops=fused,
                         fused_error=fused / published - 1, mem_gb=row.mem_gb, comm_frac=row.comm_frac,
                         step_s=row.step_s, attention_share=row.compute_by_class_s.get("attention", 0.0) / row.step_s,
                         matmul_share=row.compute_by_class_s.get("matmul", 0.0) / row.step_s,
                         memory_share=row.memory_bound_s / row.step_s))
    return rows


def _sp_call(method: str, cp: int, layout: str, b: int, s_local: int, h: int, hk: int, d: int) -> RankSim:
    """Simulate one fwd+bwd of an SP attention function alone (fake tensors, fake CP group of `cp`)."""
    from lctrain import sp
    from lctrain.parallel.mesh import MeshConfig
    from lctrain.rehearse.watch import MemoryWatcher
    from lctrain.rehearse.world import fake_world

    rank = cp - 1 if layout == "contiguous" else 0
    fn = {"ring": sp.ring_attention, "allgather": sp.allgather_attention, "ulysses": sp.ulysses_attention}[method]
    with fake_world(cp, rank, MeshConfig(cp=cp, cp_layout=layout)) as mesh:
        q = torch.zeros(b, s_local, h, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        k = torch.zeros(b, s_local, hk, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        v = torch.zeros(b, s_local, hk, d, dtype=torch.bfloat16, device="meta", requires_grad=True)
        tracker, memory, watch = StepTracker(), MemoryWatcher(), _CommWatch(mesh.tp_group)
        with watch.active() as rec, memory, tracker:
            o = fn(q, k, v, group=mesh.cp_group, causal=True, layout=layout)
            watch.phase = "bwd"
            o.backward(torch.zeros_like(o))
        comm = _collect_comm(rec, watch.megatron, cp)
    dummy = SimSpec(ModelConfig(num_heads=h, num_kv_heads=hk, hidden_size=h * d), cp=cp, cp_layout=layout,
                    seq_len=s_local * cp, micro_batch=b)
    return RankSim(spec=dummy, world=cp, params_local=0, params_tp_replicated=0, param_bytes=0,
                   activation_peak_bytes=memory.peak, activation_after_forward_bytes=0, flops=dict(tracker.flops),
                   memory_bound_bytes=tracker.memory_bytes, comm=comm,
                   sim_seconds=0.0, flops_detail=dict(tracker.flops_detail), bytes_detail=dict(tracker.bytes_detail))


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
                             error=eff - published[(dev, name)], compute_s=est.compute_s,
                             memory_bound_s=est.memory_bound_s, comm_exposed_s=est.comm_exposed_s))
    return rows


def lasp2_table(checkpointing: tuple[str, ...] = ("none", "selective"), cache=None) -> list[dict]:
    """Predicted LASP-2 / LASP-1 throughput of Linear-Llama3-1B, 64 A100-80G (8 per node), 2048K tokens, per
    activation-checkpointing mode, with the terms that separate them: LASP-1's chain (exposed), LASP-2's extra
    compute (its inter-chunk term outside the kernel), and the what-if of a chain paid at every layer."""
    from lctrain.config import load_config
    from lctrain.plan.search import plan_rows

    hw = get_hardware("a100-80g")
    cache = cache or _fresh_cache()
    base = load_config("configs/linear-llama3-1b.yaml").model
    seq, cp = 2048 * 1024, 64
    rows, ratios = [], []
    for ac in checkpointing:
        out = {}
        for lsp, layout in (("lasp2", "zigzag"), ("lasp2", "contiguous"), ("lasp1", "contiguous")):
            spec = SimSpec(replace(base, linear_sp=lsp), tp=1, cp=cp, cp_layout=layout, seq_len=seq,
                           activation_checkpointing=ac)
            sim, (row,) = plan_rows(spec, 64, 8, hw, [1], cache)
            out[f"{lsp} ({layout})"] = row
        lasp1 = out["lasp1 (contiguous)"]
        chain = sum(v for k, v in lasp1.comm_exposed_by_kind_s.items() if k.startswith("lasp1"))
        per_layer_step = lasp1.step_s - chain + _chain_every_layer(sim, hw, base.num_layers, ac != "none")
        rows += [dict(checkpointing=ac, method=m, tokens_per_s=r.tokens_per_s, step_s=r.step_s,
                      compute_s=r.compute_s, linear_attention_s=r.compute_by_class_s.get("linear_attention", 0.0),
                      memory_bound_s=r.memory_bound_s, comm_exposed_s=r.comm_exposed_s, mem_gb=r.mem_gb,
                      oom=r.oom) for m, r in out.items()]
        for m in ("lasp2 (zigzag)", "lasp2 (contiguous)"):
            r = out[m]
            ratio = r.tokens_per_s / lasp1.tokens_per_s
            ratios.append(dict(checkpointing=ac, method=f"{m} / lasp1", published=1.152, predicted=ratio,
                               error=ratio - 1.152, lasp1_chain_s=chain,
                               lasp2_extra_compute_s=r.compute_s - lasp1.compute_s,
                               per_layer_chain_ratio=per_layer_step / r.step_s))
    return rows + ratios


def _chain_every_layer(sim: RankSim, hw: Hardware, layers: int, recompute: bool) -> float:
    """LASP-1's exposed chain if every layer paid (CP-1) hops in each direction (no wavefront), plus the
    recomputed forward chains under checkpointing: the same hops as timemodel.estimate_step."""
    from lctrain.plan.timemodel import collective_time, group_spans_nodes, lasp1_hop_work_s, link_for

    cp = sim.spec.cp
    link = link_for(hw, group_spans_nodes("cp", sim.spec.tp, cp, 1, 8))
    total = 0.0
    for phase in ("fwd", "bwd"):
        sizes = [c.bytes / c.calls for c in sim.comm if c.tag == f"lasp1.{phase}" and c.op == "send" and c.calls]
        state = max(sizes) if sizes else 0.0
        hop = collective_time("send", state, 2, link) + lasp1_hop_work_s(sim, hw, state, phase)
        total += (2 if phase == "fwd" and recompute else 1) * layers * (cp - 1) * hop
    return total


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(cache=None) -> str:
    """The three comparisons as the Markdown docs/planner.md carries between BEGIN and END."""
    cache = cache or _fresh_cache()
    out = ["### 1. ring-flash-attention: zigzag efficiency on 8 GPUs, 8K tokens per GPU\n",
           "| GPUs | method | published | predicted | error (points) | compute s | of which memory-bound s "
           "| exposed comm s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ring_flash_attn_table():
        out.append(f"| {r['gpu']} | {r['method']} | {_pct(r['published'])} | {_pct(r['predicted'])} "
                   f"| {100 * r['error']:+.1f} | {r['compute_s']:.4f} | {r['memory_bound_s']:.4f} "
                   f"| {r['comm_exposed_s']:.4f} |")
    out += ["", "### 2. LASP-2 vs LASP-1: Linear-Llama3-1B, 64 x A100-80G (8 per node), 2048K tokens, ZeRO-1\n",
            "| checkpointing | method (layout) | tokens/s | step s | compute s | linear-attention s | memory-bound s "
            "| exposed comm s | mem GB/GPU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = lasp2_table(cache=cache)
    for r in rows:
        if "tokens_per_s" in r:
            out.append(f"| {r['checkpointing']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} "
                       f"| {r['compute_s']:.3f} | {r['linear_attention_s']:.3f} | {r['memory_bound_s']:.3f} "
                       f"| {r['comm_exposed_s']:.3f} | {r['mem_gb']:.1f}{' (OOM)' if r['oom'] else ''} |")
    out += ["", "| checkpointing | ratio | published | predicted | error (points) | LASP-1 chain, exposed s "
                "| LASP-2's extra compute s | ratio if the chain were paid at every layer |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "predicted" in r:
            out.append(f"| {r['checkpointing']} | {r['method']} | {r['published']:.3f} | {r['predicted']:.3f} "
                       f"| {100 * r['error']:+.1f} | {r['lasp1_chain_s']:.3f} | {r['lasp2_extra_compute_s']:+.3f} "
                       f"| {r['per_layer_chain_ratio']:.3f} |")
    out += ["", "### 3. NVIDIA NeMo: Llama-2-7B with context parallelism on DGX-H100 (TFLOPS per GPU)\n",
            "| seq | GPUs | TP | DP | CP | published (FP8) | predicted (bf16, lctrain's FLOPs) | error "
            "| x NeMo's FLOP convention | + FP8 GEMMs | error | + no memory-bound passes | error "
            "| attention / matmul / memory-bound share of the step | exposed comm | mem GB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in nemo_table(cache=cache):
        out.append(f"| {r['seq_k']}K | {r['gpus']} | {r['tp']} | {r['dp']} | {r['cp']} | {r['published_tflops']} "
                   f"| {r['predicted_tflops']:.0f} | {100 * r['error']:+.0f}% | {r['nemo_convention_tflops']:.0f} "
                   f"| {r['fp8_and_convention_tflops']:.0f} | {100 * r['residual_error']:+.0f}% "
                   f"| {r['fused_tflops']:.0f} | {100 * r['fused_error']:+.0f}% "
                   f"| {_pct(r['attention_share'])} / {_pct(r['matmul_share'])} / {_pct(r['memory_share'])} "
                   f"| {_pct(r['comm_frac'])} | {r['mem_gb']:.1f} |")
    return "\n".join(out) + "\n"


def page_section(text: str) -> str:
    """The generated part of a page (between BEGIN and END); ValueError when the markers are missing."""
    if BEGIN not in text or END not in text:
        raise ValueError("the page has no published-comparison markers")
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"


def write(path: str, cache=None) -> None:
    from pathlib import Path

    page = Path(path).read_text()
    new = markdown(cache)
    start, end = page.index(BEGIN) + len(BEGIN), page.index(END)
    Path(path).write_text(page[:start] + "\n" + new + page[end:])


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write"]:
        write(argv[1])
    else:
        print(markdown())


if __name__ == "__main__":
    main()
