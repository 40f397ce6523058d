"""`lctrain bench sp`: sequence-parallel attention methods side by side over a sequence-length sweep.

For each method and global sequence length it runs forward + backward on CP ranks and reports, per rank, in
steady state (after one warm-up step): bytes put on the wire and calls per collective (from `record_comm`,
forward and backward, object collectives included), the agreement exchanges of the FIRST call of the
signature (object collectives; 0 afterwards), host syncs during one forward + backward
(`lctrain.testing.hot_path.count_host_syncs`, expected 0), the activation bytes one layer keeps for backward
(`graph_saved_bytes`: every tensor its autograd graph saves, its inputs included), peak memory of one step
(CPU: allocations recorded by the torch profiler, relative to the step's start; GPU:
`torch.cuda.max_memory_allocated`), the time of one forward + backward (each step timed from a barrier to its
slowest rank; the best of `--iters` steps), and the local backend(s) that ran. Prints a Markdown table.

    lctrain bench sp --world 4 --seq 1024 2048 4096 --heads 8 --kv-heads 2 --dim 64
    torchrun --nproc-per-node 4 -m lctrain bench sp ...    # in place on the launched ranks (GPU if present)

Without torchrun it spawns `--world` gloo ranks on the CPU. A method is one entry of :data:`METHODS`:
name -> callable(q, k, v, group, layout) returning the local output (q, k, v are `[b, s_local, h, d]`).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from lctrain.ops import attention as attention_ops
from lctrain.ops import linear_attention as linear_ops
from lctrain.ops.linear_attention import default_log_decay
from lctrain.parallel import MeshConfig, comm, init_mesh, record_comm
from lctrain.testing.hot_path import count_host_syncs, graph_saved_bytes
from lctrain.sp import (allgather_attention, lasp1_linear_attention, lasp2_linear_attention, ring_attention,
                        ulysses_attention)

MethodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "dist.ProcessGroup | None", str], torch.Tensor]

#: Benchmarked methods: name -> callable(q, k, v, group, layout). Causal everywhere.
METHODS: dict[str, MethodFn] = {
    "ring": lambda q, k, v, group, layout: ring_attention(q, k, v, group=group, causal=True, layout=layout),
    "allgather": lambda q, k, v, group, layout: allgather_attention(q, k, v, group=group, causal=True,
                                                                    layout=layout),
    "ulysses": lambda q, k, v, group, layout: ulysses_attention(q, k, v, group=group, causal=True, layout=layout),
}


def _linear(fn: Callable[..., torch.Tensor]) -> MethodFn:
    """A linear-attention method with lightning attention's default decay; GQA K/V repeated to q's heads."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
            layout: str) -> torch.Tensor:
        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return fn(q, k, v, default_log_decay(q.shape[2], device=q.device), group, layout)
    return run


METHODS["lasp2"] = _linear(lambda q, k, v, ld, group, layout: lasp2_linear_attention(q, k, v, ld, group=group,
                                                                                     layout=layout))
#: LASP-1 is contiguous only: it ignores the layout (the timing does not depend on which tokens a rank holds).
METHODS["lasp1"] = _linear(lambda q, k, v, ld, group, layout: lasp1_linear_attention(q, k, v, ld, group=group))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lctrain bench sp", description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=4, help="CP ranks to spawn (ignored under torchrun)")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096], help="global sequence lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--dim", type=int, default=64, help="head dim")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {sorted(METHODS)}")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--iters", type=int, default=3, help="timed steps, best reported (after one warm-up step)")
    return p.parse_args(argv)


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of tensor allocations made during `step` (torch profiler, CPU)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # Kineto writes a trace line to fd 2 at every start/stop; keep the benchmark's output readable.
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_rank(methods: list[str], seqs: list[int], heads: int, kv_heads: int, dim: int, batch: int, layout: str,
               dtype_name: str, iters: int) -> list[dict]:
    """Run the sweep on this rank (inside an initialised process group); one dict per (method, seq)."""
    world = dist.get_world_size() if comm.is_distributed() else 1
    mesh = init_mesh(MeshConfig(cp=world))
    group = mesh.cp_group
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    rows = []
    for seq in seqs:
        s_local = seq // world
        g = torch.Generator(device=device).manual_seed(1234 + mesh.cp_rank)
        q = torch.randn(batch, s_local, heads, dim, generator=g, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, s_local, kv_heads, dim, generator=g, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, s_local, kv_heads, dim, generator=g, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(batch, s_local, heads, dim, generator=g, device=device, dtype=dtype)
        for name in methods:
            fn = METHODS[name]

            def step() -> None:
                fn(q, k, v, group, layout).backward(do)
                q.grad = k.grad = v.grad = None

            with record_comm() as first:
                step()  # warm-up: the signature's agreement exchange happens here
            with count_host_syncs() as syncs, attention_ops.REGISTRY.track() as soft, \
                    linear_ops.REGISTRY.track() as lin:
                with record_comm() as fwd:
                    o = fn(q, k, v, group, layout)
                saved_bytes = graph_saved_bytes(o)
                with record_comm() as bwd:
                    o.backward(do)
            del o
            q.grad = k.grad = v.grad = None
            if device.type == "cuda":
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                _sync(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                peak = _cpu_peak_bytes(step)
            times = []
            for _ in range(iters):
                comm.barrier(group)
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            rows.append(dict(
                method=name, seq=seq, rank=mesh.cp_rank, times_s=times, peak_bytes=peak,
                fwd_bytes=sum(e.bytes for e in fwd.events), bwd_bytes=sum(e.bytes for e in bwd.events),
                fwd_calls=_calls(fwd), bwd_calls=_calls(bwd), first_objects=first.calls("all_gather_object"),
                host_syncs=syncs.count, saved_bytes=saved_bytes, backends=sorted(set(soft) | set(lin)),
            ))
    return rows


def _calls(rec: comm.CommRecorder) -> str:
    """Calls per collective, e.g. "all_gather 1" or "send 3, recv 3" ("-": none)."""
    return ", ".join(f"{op} {v['calls']}" for op, v in sorted(rec.summary().items())) or "-"


def _table(per_rank: list[list[dict]]) -> str:
    """Markdown table: bytes/calls/peak as the maximum over ranks, time of the slowest rank."""
    merged: dict[tuple[str, int], list[dict]] = {}
    for rows in per_rank:
        for r in rows:
            merged.setdefault((r["method"], r["seq"]), []).append(r)
    lines = ["| method | seq | sent/rank fwd (KiB) | sent/rank bwd (KiB) | calls fwd (rank 0) | calls bwd (rank 0) "
             "| 1st-call object coll. | host syncs | saved/layer (KiB) | peak mem/rank (MiB) | fwd+bwd (ms) "
             "| backend |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    numeric = ("fwd_bytes", "bwd_bytes", "first_objects", "host_syncs", "saved_bytes", "peak_bytes")
    for (method, seq), rs in sorted(merged.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mx = {key: max(r[key] for r in rs) for key in numeric}
        rank0 = min(rs, key=lambda r: r["rank"])
        # Each step ends when its slowest rank does; the best step is the least disturbed by other load.
        mx["time_s"] = min(max(step) for step in zip(*(r["times_s"] for r in rs)))
        backends = sorted({b for r in rs for b in r["backends"]})
        lines.append(f"| {method} | {seq} | {mx['fwd_bytes'] / 1024:.1f} | {mx['bwd_bytes'] / 1024:.1f} "
                     f"| {rank0['fwd_calls']} | {rank0['bwd_calls']} | {mx['first_objects']} | {mx['host_syncs']} "
                     f"| {mx['saved_bytes'] / 1024:.1f} | {mx['peak_bytes'] / 2**20:.2f} | {mx['time_s'] * 1e3:.1f} "
                     f"| {', '.join(backends)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lctrain bench`; the first argument names the benchmark ("sp")."""
    argv = list(argv or [])
    if not argv or argv[0] != "sp":
        print("usage: lctrain bench sp [--world N] [--seq S ...] [--heads H] [--kv-heads HK] [--dim D] "
              "[--methods m1,m2] [--layout zigzag|contiguous] [--dtype float32] [--iters N]")
        return 2
    args = _parse(argv[1:])
    kv_heads = args.kv_heads or args.heads
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else args.world
    parts = 2 * world if args.layout == "zigzag" else world
    bad = [s for s in args.seq if s % parts]
    if bad:
        raise SystemExit(f"sequence lengths {bad} are not divisible by {parts} ({args.layout} layout, CP={world})")
    task = (methods, args.seq, args.heads, kv_heads, args.dim, args.batch, args.layout, args.dtype, args.iters)
    if under_launcher:
        from lctrain.parallel.mesh import init_distributed

        init_distributed()
        per_rank = comm.all_gather_object(bench_rank(*task))
        if dist.get_rank() != 0:
            return 0
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    else:
        from lctrain.testing import run_distributed

        per_rank = run_distributed(bench_rank, world, *task, timeout_s=3600.0)
        device = f"CPU, gloo, {world} spawned ranks (1 thread each)"
    print(f"# SP attention benchmark: CP={world}, {device}, causal, layout={args.layout}, batch={args.batch}, "
          f"heads={args.heads}, kv_heads={kv_heads}, head_dim={args.dim}, {args.dtype}, best of {args.iters} steps\n")
    print(_table(per_rank))
    return 0
