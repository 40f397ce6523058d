"""CPU timings and byte counts of the gated ops and of LASP-2 over them (docs/gated.md).

    .venv/bin/python benchmarks/bench_gated.py [--seq 2048] [--cp 2 4] [--repeats 3]

1. Local ops, one process: token-by-token recurrence vs chunked form, forward + backward.
2. LASP-2 for the gated delta rule and the gated forms on CP gloo ranks (spawned, one thread each): time per
   forward + backward, bytes per rank (counted by lctrain.parallel.comm), at two sequence lengths.
3. Bytes per layer per rank of the alternatives at a production shape (formulas in README_lasp2_gated.md).
Timings on a shared CPU are indicative only.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from lctrain.ops.gated_delta import gated_delta_rule
from lctrain.ops.gla import gated_linear_attention


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def local_ops(seq: int, repeats: int) -> None:
    b, h, d = 1, 4, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, seq, h, d, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    gs = -torch.rand(b, seq, h, generator=g) * 0.1
    gv = -torch.rand(b, seq, h, d, generator=g) * 0.1
    beta = torch.rand(b, seq, h, generator=g)
    print(f"## local ops, float32, b={b} s={seq} h={h} dk=dv={d}, forward + backward (best of {repeats})\n")
    print("| op | recurrent s | chunk s |\n|---|---:|---:|")
    cases = [("GLA scalar gate", lambda be: gated_linear_attention(*leaves(q, k, v, gs), backend=be)),
             ("GLA vector gate", lambda be: gated_linear_attention(*leaves(q, k, v, gv), backend=be)),
             ("gated delta rule", lambda be: gated_delta_rule(*leaves(q, k, v, gs, beta), backend=be))]
    for name, call in cases:
        times = [_time(lambda: call(be)[0].sum().backward(), repeats) for be in ("recurrent", "chunk")]
        print(f"| {name} | {times[0]:.3f} | {times[1]:.3f} |")
    print()


def leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def _sp_case(seq: int, repeats: int):
    from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
    from lctrain.sp import lasp2_delta_attention
    from lctrain.sp.lasp1_delta import lasp1_delta_attention
    from lctrain.sp.lasp2_delta import lasp2_chunk_map_attention

    torch.set_num_threads(1)
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    b, h, d = 1, 4, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, seq, h, d, generator=g) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    gs = -torch.rand(b, seq, h, generator=g) * 0.1
    gv = -torch.rand(b, seq, h, d, generator=g) * 0.1
    beta = torch.rand(b, seq, h, generator=g)
    out = {}
    for layout in ("contiguous", "zigzag"):
        loc = [shard_sequence(x, dim=1, layout=layout) for x in (q, k, v, gs, gv, beta)]
        calls = {
            "delta": lambda: lasp2_delta_attention(*leaves(loc[0], loc[1], loc[2], loc[5]), log_decay=loc[3],
                                                   layout=layout),
            "scalar": lambda: lasp2_chunk_map_attention(*leaves(*loc[:4]), None, "scalar", layout=layout),
            "vector": lambda: lasp2_chunk_map_attention(*leaves(*loc[:3], loc[4]), None, "vector", layout=layout),
        }
        if layout == "contiguous":
            calls["delta (LASP-1)"] = lambda: lasp1_delta_attention(*leaves(loc[0], loc[1], loc[2], loc[5]),
                                                                    log_decay=loc[3])
        for name, call in calls.items():
            call().sum().backward()  # warm-up (and the once-per-signature agreement)
            with comm.record_comm() as rec:
                call().sum().backward()
            t = _time(lambda: call().sum().backward(), repeats)
            out[(name, layout)] = (t, rec.bytes("all_gather") + rec.bytes("send"),
                                   rec.calls("all_gather") + rec.calls("send"))
    return out


def sp(seqs: list[int], cps: list[int], repeats: int) -> None:
    from lctrain.testing import run_distributed

    print(f"## LASP-2 over chunk maps, float32, b=1 h=4 dk=dv=32, gloo ranks, forward + backward (best of {repeats})\n")
    print("| CP | seq | layout | recurrence | s / step (rank 0) | collectives (all-gathers or sends) | "
          "bytes sent by rank 0 |")
    print("|---:|---:|---|---|---:|---:|---:|")
    for cp in cps:
        for seq in seqs:
            res = run_distributed(_sp_case, cp, seq, repeats, timeout_s=900)[0]
            for (name, layout), (t, nbytes, calls) in sorted(res.items()):
                print(f"| {cp} | {seq} | {layout} | {name} | {t:.3f} | {calls} | {nbytes} |")
    print()


def alternatives() -> None:
    h, dk, dv, P = 16, 128, 128, 8
    print(f"## bytes per layer per rank, forward, bf16 activations / fp32 states, b=1 h={h} dk=dv={dk}, CP={P}\n")
    print("| S (tokens) | LASP-2 delta, contiguous | LASP-2 delta, zigzag | LASP-1 (P-1 serial steps) | "
          "all-to-all head re-sharding |")
    print("|---:|---:|---:|---:|---:|")
    for s in (32 * 1024, 128 * 1024, 1024 * 1024):
        lasp2 = h * dk * (dk + dv) * 4
        lasp1 = h * dk * dv * 4
        s_loc = s // P
        a2a = (P - 1) / P * s_loc * h * ((2 * dk + dv + 2) + dv) * 2
        print(f"| {s} | {lasp2 / 2**20:.2f} MiB | {2 * lasp2 / 2**20:.2f} MiB | {lasp1 / 2**20:.2f} MiB | "
              f"{a2a / 2**20:.1f} MiB |")
    print(f"\n(all-to-all re-sharding also needs h % CP == 0: CP <= {h} here.)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048, help="sequence length of the local-op timings")
    ap.add_argument("--sp-seqs", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-local", action="store_true", help="skip the local-op timings")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.skip_local:
        local_ops(args.seq, args.repeats)
    sp(args.sp_seqs, args.cp, args.repeats)
    alternatives()


if __name__ == "__main__":
    main()
