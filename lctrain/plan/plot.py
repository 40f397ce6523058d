"""Predicted tokens/s and memory per GPU against sequence length, one line per SP method (as the LASP-2 paper
draws its comparison), for a fixed layout (tp, cp) at the job's GPU count."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lctrain.models.config import LINEAR_SP, SOFTMAX_SP, ModelConfig
from lctrain.plan.hardware import Hardware


def method_variants(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(label, softmax_sp, linear_sp) for every method of the layer types the model has."""
    mixers = set(cfg.mixers)
    if mixers == {"L"}:
        return [(lsp, cfg.softmax_sp, lsp) for lsp in LINEAR_SP]
    if mixers == {"A"}:
        return [(ssp, ssp, cfg.linear_sp) for ssp in SOFTMAX_SP]
    return [(f"{lsp}+{ssp}", ssp, lsp) for lsp in LINEAR_SP for ssp in SOFTMAX_SP]


def plot_methods(cfg: ModelConfig, gpus: int, gpus_per_node: int, seq: int, hw: Hardware, path: str,
                 tp: int = 1, cp: int = 1, micro_batch: int = 1, zero_stage: int = 1,
                 activation_checkpointing: str = "none", points: int = 6, cache=None) -> str:
    """Sweep sequence lengths seq / 2^k (k < points) for each method; write a two-panel PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lctrain.plan.search import plan_rows
    from lctrain.plan.simulate import SimSpec

    seqs = sorted({seq >> k for k in range(points) if (seq >> k) % (2 * cp) == 0 and (seq >> k) > 0})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for label, ssp, lsp in method_variants(cfg):
        layout = "contiguous" if lsp == "lasp1" and "L" in cfg.mixers else "zigzag"
        model = replace(cfg, softmax_sp=ssp, linear_sp=lsp)
        try:
            model.validate_parallel(tp, cp, layout)
        except ValueError:
            continue
        xs, tok, mem = [], [], []
        for s in seqs:
            spec = SimSpec(model, tp=tp, cp=cp, cp_layout=layout, seq_len=s, micro_batch=micro_batch,
                           activation_checkpointing=activation_checkpointing)
            _, rows = plan_rows(spec, gpus, gpus_per_node, hw, [zero_stage], cache)
            xs.append(s)
            tok.append(rows[0].tokens_per_s)
            mem.append(rows[0].mem_gb)
        ax_t.plot(xs, tok, marker="o", label=label)
        ax_m.plot(xs, mem, marker="o", label=label)
    for ax, name in ((ax_t, "tokens/s (all GPUs)"), (ax_m, "memory per GPU (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    ax_m.axhline(hw.memory_gb, color="red", linestyle="--", linewidth=1, label=f"{hw.name} memory")
    ax_t.legend()
    ax_m.legend()
    fig.suptitle(f"predicted: {gpus} x {hw.name}, tp={tp} cp={cp}, ZeRO-{zero_stage}, "
                 f"checkpointing={activation_checkpointing}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
