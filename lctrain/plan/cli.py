"""`lctrain plan`: predicted memory, step time, tokens/s, MFU and communication share of a job before booking it.

    lctrain plan CONFIG [k=v ...] --gpus N --gpus-per-node G --seq S --hardware h100|h200|a100-80g \
                 [--search] [--json] [--plot FILE]

Without --search: the config's layout (parallel.tp / parallel.cp, model.softmax_sp / linear_sp,
model.activation_checkpointing, train.zero_stage, train.micro_batch_size) at N GPUs. With --search: every valid
layout (lctrain.plan.search), best first, and the recommendation. This module only parses and prints.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from lctrain.plan.hardware import HARDWARE


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain plan", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config (model, parallel, train sections are read)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs of the job")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="global sequence length (default: data.seq_len)")
    p.add_argument("--hardware", default="h100", help=f"device table: {', '.join(sorted(HARDWARE))}")
    p.add_argument("--search", action="store_true", help="every valid layout instead of the config's")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--plot", default=None, help="write tokens/s and memory vs sequence length per method (PNG)")
    p.add_argument("--plot-points", type=int, default=6, help="sequence lengths in the plot: seq / 2^k, k < this")
    p.add_argument("--top", type=int, default=15, help="rows to print with --search (all with --json)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the simulation cache")
    p.add_argument("--tp", type=int, nargs="+", default=None, help="--search only these TP sizes")
    p.add_argument("--cp", type=int, nargs="+", default=None, help="--search only these CP sizes")
    p.add_argument("--softmax-sp", nargs="+", default=None, help="--search only these softmax SP methods")
    p.add_argument("--linear-sp", nargs="+", default=None, help="--search only these linear SP methods")
    p.add_argument("--window-sp", nargs="+", default=None,
                   help="--search only these SP methods for sliding-window (W) layers (halo, allgather, ring)")
    p.add_argument("--checkpointing", nargs="+", default=None, help="--search only these: none selective full")
    p.add_argument("--zero", type=int, nargs="+", default=None, help="--search only these ZeRO stages")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: train.global_batch_size); sets the accumulation")
    p.add_argument("--doc-len", type=int, default=None,
                   help="packed documents of this many tokens (attention FLOPs summed per document)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size: not modelled (only 1 is accepted)")
    return p.parse_args(argv)


def _fmt_row(r) -> str:
    mem = f"{r.mem_gb:7.1f}{'!' if r.oom else ' '}"
    ssp = r.softmax_sp if r.window_sp is None else f"{r.softmax_sp}, W:{r.window_sp}"
    if not r.simulated:
        return (f"| {r.tp:>2} | {r.cp:>3} | {r.dp:>3} | {ssp:<9} | {r.linear_sp:<5} | {r.zero_stage} "
                f"| {r.activation_checkpointing:<9} | >{mem} | - | - | - | - |")
    return (f"| {r.tp:>2} | {r.cp:>3} | {r.dp:>3} | {ssp:<9} | {r.linear_sp:<5} | {r.zero_stage} "
            f"| {r.activation_checkpointing:<9} | {mem} | {r.step_s:8.3f} | {r.tokens_per_s:10.0f} "
            f"| {100 * r.mfu:5.1f} | {100 * r.comm_frac:5.1f} |")


_HEADER = ("| tp | cp | dp | softmax_sp | linear_sp | zero | checkpointing | mem/GPU GB | step s | tokens/s "
           "| MFU % | comm % |\n|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    from lctrain.config import load_config
    from lctrain.plan.hardware import get_hardware
    from lctrain.plan.search import (SimCache, check_plan_inputs, plan_rows, recommend, search)
    from lctrain.plan.simulate import SimSpec
    from lctrain.plan.timemodel import Job

    try:
        if args.pp != 1:
            raise ValueError(f"pipeline parallelism (--pp {args.pp}) is not modelled by the planner: it simulates "
                             "TP x CP x DP layouts only (lctrain trains without pipeline stages)")
        hw = get_hardware(args.hardware)
        cfg = load_config(args.config, args.overrides)
        seq = args.seq or cfg.data.seq_len
        model = cfg.model
        tp, cp, layout = cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.cp_layout
        check_plan_inputs(model, args.gpus, args.gpus_per_node, seq,
                          None if args.search else tp, None if args.search else cp, layout)
        job = Job(global_batch=args.global_batch or cfg.train.global_batch_size, doc_len=args.doc_len)
        job.attention_factor(seq)
        if not args.search:
            job.accumulation(cfg.train.micro_batch_size, args.gpus // (tp * cp))
    except ValueError as err:
        print(f"lctrain plan: {err}", file=sys.stderr)
        return 2
    cache = SimCache(None if args.no_cache else "default")
    mb = cfg.train.micro_batch_size
    where = (f"{args.gpus} x {hw.name} ({args.gpus_per_node} per node), sequence {seq}, micro-batch {mb}, bf16; "
             f"memory {hw.memory_gb:.0f} GB per GPU ('!' = does not fit)")
    if args.search:
        progress = None if args.json else (lambda msg: print(f"  simulating {msg}", file=sys.stderr, flush=True))
        try:
            rows = search(model, args.gpus, args.gpus_per_node, seq, hw, micro_batch=mb, cache=cache,
                          progress=progress, job=job, tps=args.tp, cps=args.cp, softmax_sps=args.softmax_sp,
                          linear_sps=args.linear_sp, window_sps=args.window_sp,
                          checkpointing=args.checkpointing or ("none", "selective", "full"),
                          zero_stages=args.zero or (0, 1, 2, 3))
        except ValueError as err:
            print(f"lctrain plan: {err}", file=sys.stderr)
            return 2
        best = recommend(rows)
        if args.json:
            print(json.dumps([_jsonable(r.to_dict()) for r in rows], indent=1))
        else:
            print(f"# lctrain plan --search: {args.config}: {where}\n")
            print(_HEADER)
            for r in rows[: args.top]:
                print(_fmt_row(r))
            print(f"\n{len(rows)} rows ({sum(not r.oom for r in rows)} fit); showing {min(args.top, len(rows))}.")
            if best is None:
                print("no layout fits in memory: more GPUs, a shorter sequence or a larger device")
            else:
                print(f"recommended: tp={best.tp} cp={best.cp} dp={best.dp} layout={best.cp_layout} "
                      f"softmax_sp={best.softmax_sp} linear_sp={best.linear_sp} "
                      + (f"window_sp={best.window_sp} " if best.window_sp else "") +
                      f"zero_stage={best.zero_stage} "
                      f"activation_checkpointing={best.activation_checkpointing}: {best.tokens_per_s:.0f} tokens/s, "
                      f"{best.mem_gb:.1f} GB/GPU, MFU {100 * best.mfu:.1f}%")
    else:
        spec = SimSpec(model, tp=tp, cp=cp, cp_layout=layout, seq_len=seq, micro_batch=mb,
                       activation_checkpointing=model.activation_checkpointing)
        sim, rows = plan_rows(spec, args.gpus, args.gpus_per_node, hw, [cfg.train.zero_stage], cache, job)
        r = rows[0]
        if args.json:
            print(json.dumps([_jsonable(r.to_dict())], indent=1))
        else:
            print(f"# lctrain plan: {args.config}: {where}\n")
            print(_HEADER)
            print(_fmt_row(r))
            print(f"\nper GPU: states {r.states_gb:.1f} GB (ZeRO-{r.zero_stage} over DPxCP={r.dp * r.cp}) + "
                  f"activation peak {r.activations_gb:.1f} GB + OOM margin {r.margin_gb:.1f} GB "
                  f"({hw.fragmentation:.0%} fragmentation + {hw.memory_reserve_gb:.0f} GB reserve); "
                  f"{sim.params_local / 1e9:.3f} B parameters per TP shard")
            print(breakdown(r))
            print("simulated rank's collectives (per micro-batch):")
            for c in sim.comm:
                print(f"  {c.group:<2} {c.tag:<16} {c.op:<14} x{c.calls:<5} {c.bytes / 2**20:12.1f} MiB "
                      f"(group of {c.group_size})")
            print(f"simulated in {sim.sim_seconds:.1f} s")
    if args.plot:
        from lctrain.plan.plot import plot_methods

        out = plot_methods(model, args.gpus, args.gpus_per_node, seq, hw, args.plot, tp=tp, cp=cp, micro_batch=mb,
                           zero_stage=cfg.train.zero_stage,
                           activation_checkpointing=model.activation_checkpointing, points=args.plot_points,
                           cache=cache)
        print(f"plot: {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def breakdown(r) -> str:
    """Where the step's time goes (the table under a plan)."""
    lines = [f"step {r.step_s:.4f} s = {r.accumulation} micro-batch(es) x compute + exposed communication "
             f"{r.comm_exposed_s:.4f} s (of {r.comm_total_s:.4f} s) + optimizer {r.optimizer_s:.4f} s",
             "", "| part | seconds per step | share |", "|---|---:|---:|"]

    def row(name: str, t: float) -> None:
        lines.append(f"| {name} | {t:.4g} | {100 * t / r.step_s:.1f}% |")

    for cls, t in sorted(r.compute_by_class_s.items()):
        row(f"compute: {'memory-bound' if cls == 'memory' else cls}", t)
    for scope, t in sorted(r.compute_by_mixer_s.items()):
        row(f"compute by mixer: {scope}", t)
    for kind, t in sorted(r.comm_exposed_by_kind_s.items()):
        row(f"exposed comm: {kind} (total {r.comm_total_by_kind_s.get(kind, 0.0):.4g})", t)
    row("optimizer", r.optimizer_s)
    return "\n".join(lines)


def _jsonable(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

