"""Benchmark lctrain's Triton kernels against their strongest peers on one GPU and write a Markdown table.

    python benchmarks/bench_kernels.py [--seqlens 1024 ... 65536] [--head-dims 64 128] [--out docs/kernel_benchmarks.md]

Times forward and forward+backward (bf16) over sequence lengths, at a fixed number of tokens per batch:
- lightning attention (lctrain.kernels.lightning_attention) vs flash-linear-attention's `chunk_simple_gla`
  (the same op: scalar per-head decay), when `fla` is importable;
- flash attention, causal (lctrain.kernels.flash_attention) vs PyTorch SDPA restricted to its flash backend
  and flash-attn's `flash_attn_func` (FA2) when installed.
Each row compares with the strongest (fastest) peer of the same run and names it. Reports milliseconds,
TFLOP/s (FLOP conventions below), tokens/s and our throughput over the peer's, then the issue's goals
(flash fwd >= 0.9x and bwd >= 0.8x the peer at head dim 128; lightning fwd+bwd >= fla, tokens/s flat
from 4K to 64K) as measured, with the device, date and command line.
Needs a CUDA GPU; on CPU it refuses with a message (the kernels' CPU tests use Triton's interpreter instead).

FLOP conventions (the same count for us and the peer, so the ratio is a time ratio):
- softmax attention forward: 4 * b * h * d * (visible query-key pairs), i.e. QK^T and PV at 2 FLOP per
  multiply-add, the causal mask counted exactly; backward = 2.5 x forward (5 matmuls against 2).
- lightning attention forward with chunk C = 64: 2 * (dk + dv) * (visible pairs inside chunks) for the
  intra-chunk attention, plus 4 * n * dk * dv for q S and k^T v; backward = 3 x forward (dq; dk and dv).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

#: Chunk length the lightning-attention FLOP count assumes (independent of the kernels' block sizes).
FLOP_CHUNK = 64


def visible_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """Query-key pairs softmax attention computes: all, or j <= i + (seq_k - seq_q) when causal."""
    if not causal:
        return seq_q * seq_k
    shift = seq_k - seq_q
    return sum(min(seq_k, max(0, i + shift + 1)) for i in range(seq_q))


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of softmax attention forward (or forward + backward when `backward`)."""
    forward = 4.0 * batch * heads * head_dim * visible_pairs(seq_q, seq_k, causal)
    return forward * (3.5 if backward else 1.0)


def lightning_flops(batch: int, heads: int, seq: int, dk: int, dv: int, backward: bool = False,
                    chunk: int = FLOP_CHUNK) -> float:
    """FLOPs of causal linear attention computed chunk-wise (forward, or forward + backward)."""
    full, rest = divmod(seq, chunk)
    intra_pairs = full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    forward = batch * heads * (2.0 * (dk + dv) * intra_pairs + 4.0 * seq * dk * dv)
    return forward * (4.0 if backward else 1.0)


def _time_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(forward: Callable[[], torch.Tensor], grad: torch.Tensor, inputs: list[torch.Tensor]
             ) -> Callable[[], None]:
    def run() -> None:
        for x in inputs:
            x.grad = None
        forward().backward(grad)
    return run


def _lightning_cases(batch: int, heads: int, seq: int, d: int, dtype: torch.dtype):
    from lctrain.kernels.lightning_attention import lightning_attention

    q, k, v = (torch.randn(batch, seq, heads, d, device="cuda", dtype=dtype).mul_(d ** -0.5).requires_grad_()
               for _ in range(3))
    log_decay = -torch.linspace(0.01, 0.5, heads, device="cuda")
    grad = torch.randn_like(v)
    ours = lambda: lightning_attention(q, k, v, log_decay)[0]  # noqa: E731
    peers = {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        chunk_simple_gla = None
    if chunk_simple_gla is not None and "g_gamma" in inspect.signature(chunk_simple_gla).parameters:
        # per-head constant decay: exactly lightning attention (fla's own lightning_attn calls this)
        peers["fla-chunk"] = lambda: chunk_simple_gla(q, k, v, g_gamma=log_decay, scale=1.0)[0]  # noqa: E731
    elif chunk_simple_gla is not None:
        g = log_decay.expand(batch, seq, heads).contiguous()  # per-token log decay, fla's layout [b, s, h]
        peers["fla-chunk"] = lambda: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]  # noqa: E731
    return ours, peers, grad, [q, k, v]


def _flash_cases(batch: int, heads: int, seq: int, d: int, dtype: torch.dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lctrain.kernels.flash_attention import flash_attention

    q, k, v = (torch.randn(batch, seq, heads, d, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    ours = lambda: flash_attention(q, k, v, causal=True)[0]  # noqa: E731

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)
    peers = {"sdpa-flash": sdpa}
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None:
        peers["flash-attn"] = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
    return ours, peers, grad, [q, k, v]


def run(args: argparse.Namespace) -> list[dict]:
    """Time every (op, head dim, sequence length, pass); one result row each."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for op in args.ops:
        for d in args.head_dims:
            heads = max(1, args.hidden // d)
            for seq in args.seqlens:
                batch = max(1, args.tokens // seq)
                make = _lightning_cases if op == "lightning" else _flash_cases
                ours, peers, grad, inputs = make(batch, heads, seq, d, dtype)
                for mode in ("fwd", "fwd+bwd"):
                    backward = mode == "fwd+bwd"
                    flops = (lightning_flops(batch, heads, seq, d, d, backward) if op == "lightning"
                             else attention_flops(batch, heads, seq, seq, d, True, backward))
                    timed = {}
                    for name, fn in (("ours", ours), *peers.items()):
                        call = _fwd_bwd(fn, grad, inputs) if backward else fn
                        with torch.no_grad() if not backward else torch.enable_grad():
                            timed[name] = _time_ms(call, args.warmup, args.rep)
                    row = dict(op=op, d=d, heads=heads, batch=batch, seq=seq, mode=mode, flops=flops,
                               tokens=batch * seq, ours=timed.pop("ours"))
                    if timed:  # the strongest peer of this run
                        row["peer_name"], row["peer"] = min(timed.items(), key=lambda item: item[1])
                    rows.append(row)
                    print(format_row(rows[-1]), flush=True)
                del inputs
                torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    """One Markdown table row: times, TFLOP/s, tokens/s and the ratio of our throughput to the peer's."""
    def tflops(ms: float | None) -> str:
        return "n/a" if ms is None else f"{row['flops'] / (ms * 1e-3) / 1e12:.1f}"

    ours, peer = row.get("ours"), row.get("peer")
    ratio = "n/a" if ours is None or peer is None else f"{peer / ours:.2f}"
    tokens = "n/a" if ours is None else f"{row['tokens'] / (ours * 1e-3):.3g}"
    return (f"| {row['op']} | {row['d']} | {row['batch']}x{row['seq']}x{row['heads']} | {row['mode']} | "
            f"{'n/a' if ours is None else f'{ours:.3f}'} | {tflops(ours)} | {tokens} | "
            f"{row.get('peer_name', 'none')} | "
            f"{'n/a' if peer is None else f'{peer:.3f}'} | {tflops(peer)} | {ratio} |")


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, as measured: one line each (ratio = peer time / our time; > 1 means we are faster)."""
    lines = []
    by_key = {(r["op"], r["d"], r["seq"], r["mode"]): r for r in rows}
    for (op, d, seq, mode), r in sorted(by_key.items()):
        if op != "flash" or d != 128 or mode != "fwd" or "peer" not in r:
            continue
        full = by_key.get((op, d, seq, "fwd+bwd"))
        lines.append(f"flash d=128 seq={seq}: fwd {r['peer'] / r['ours']:.2f}x {r['peer_name']} (goal >= 0.9)")
        if full is not None and "peer" in full:
            ours_bwd, peer_bwd = full["ours"] - r["ours"], full["peer"] - r["peer"]
            lines.append(f"flash d=128 seq={seq}: bwd {peer_bwd / ours_bwd:.2f}x {full['peer_name']} (goal >= 0.8)")
    for d in sorted({r["d"] for r in rows if r["op"] == "lightning"}):
        full = [r for r in rows if r["op"] == "lightning" and r["d"] == d and r["mode"] == "fwd+bwd"]
        rates = [r["tokens"] / r["ours"] for r in full]
        if rates:
            lines.append(f"lightning d={d}: fwd+bwd tokens/s min/max over seq {min(rates) / max(rates):.2f} "
                         f"(goal: flat, ~1)")
        for r in full:
            if "peer" in r:
                lines.append(f"lightning d={d} seq={r['seq']}: fwd+bwd {r['peer'] / r['ours']:.2f}x {r['peer_name']} "
                             f"(goal >= 1)")
    return lines


HEADER = ("| op | head dim | b x s x h | pass | ours ms | ours TFLOP/s | ours tokens/s | strongest peer | peer ms "
          "| peer TFLOP/s | ours/peer speed |\n|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(rows: list[dict], device: str, command: str) -> str:
    """The full report: device, date, command, peers, the table and the goals."""
    return (f"# Kernel benchmarks\n\nDevice: {device}. Date: {datetime.date.today().isoformat()}. "
            f"Command: `{command}`. Peers: flash-linear-attention `chunk_simple_gla` (lightning), PyTorch SDPA "
            f"flash backend and flash-attn (softmax, causal); each row names the fastest. FLOP conventions: "
            f"benchmarks/bench_kernels.py.\n\n{HEADER}\n" + "\n".join(format_row(r) for r in rows)
            + "\n\nGoals (issue 11):\n\n" + "\n".join(f"- {line}" for line in goals(rows)) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=["lightning", "flash"], choices=["lightning", "flash"])
    parser.add_argument("--seqlens", nargs="+", type=int, default=[2 ** i for i in range(10, 17)])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head dim")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens // seq)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rep", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/kernel_benchmarks.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; this benchmark times GPU kernels and cannot run on CPU "
              "(the CPU tests check the kernels' correctness through Triton's interpreter).", file=sys.stderr)
        return 2
    command = " ".join(["python", "benchmarks/bench_kernels.py", *(argv if argv is not None else sys.argv[1:])])
    device = torch.cuda.get_device_name()
    print(f"Device: {device}. Date: {datetime.date.today().isoformat()}. Command: {command}\n{HEADER}", flush=True)
    rows = run(args)
    print("\n".join(goals(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, device, command))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
