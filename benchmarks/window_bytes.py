"""Counted communication of sliding-window layers (halo vs ring vs all-gather) and of LASP-2's fold (tree scan vs
all-gather), per rank, forward + backward, on gloo ranks (counts, not timings: they do not depend on the load).

    python benchmarks/window_bytes.py            # both tables, markdown (docs/window.md)

Window: b = 1, 8 query / 2 kv heads, head dim 64, float32, zigzag, CP 4; every rank's bytes put on the wire
(sends, all-gather input, reduce-scatter input) and calls, max over ranks. Scan: the gated delta rule, b = 1,
4 heads, dk = dv = 64, zigzag, 4 tokens per chunk; bytes a rank sends (P2P) or contributes (all-gather) and what it
receives and holds (all-gather: P x its contribution; tree: at most one message per round and direction, each
O(1) maps).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lctrain.parallel import MeshConfig, init_mesh, record_comm, shard_sequence
from lctrain.sp import allgather_attention, halo_attention, lasp2_delta_attention, ring_attention
from lctrain.sp.lasp2_scan import scan_rounds
from lctrain.testing import run_distributed

WINDOW_METHODS = {"halo": halo_attention, "ring": ring_attention, "allgather": allgather_attention}


def _window(seqs: list[int], windows: list[int]) -> dict:
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for seq in seqs:
        for window in windows:
            for name, fn in WINDOW_METHODS.items():
                q = torch.randn(1, seq // world, 8, 64, requires_grad=True)
                k, v = (torch.randn(1, seq // world, 2, 64, requires_grad=True) for _ in range(2))
                with record_comm() as rec:
                    fn(q, k, v, window=window, layout="zigzag").sum().backward()
                ev = [e for e in rec.events if e.op != "all_gather_object"]
                out[(seq, window, name)] = (sum(e.bytes for e in ev), sum(e.op != "recv" for e in ev))
    return out


def _scan(seed: int) -> dict:
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for scan in ("allgather", "tree"):
        g = torch.Generator().manual_seed(seed)
        n = 8 * world
        q, k = (torch.nn.functional.normalize(torch.randn(1, n, 4, 64, generator=g), dim=-1) for _ in range(2))
        v = torch.randn(1, n, 4, 64, generator=g)
        gate = -torch.rand(1, n, 4, generator=g)
        beta = torch.rand(1, n, 4, generator=g)
        loc = [shard_sequence(x, layout="zigzag").requires_grad_(True) for x in (q, k, v, gate, beta)]
        with record_comm() as rec:
            lasp2_delta_attention(loc[0], loc[1], loc[2], loc[4], log_decay=loc[3], layout="zigzag",
                                  scan=scan).sum().backward()
        ev = [e for e in rec.events if e.op != "all_gather_object"]
        out[scan] = (sum(e.bytes for e in ev), sum(e.op in ("all_gather", "send") for e in ev),
                     len({e.tag for e in ev if "round" in e.tag}))
    return out


def main() -> None:
    seqs, windows = [4096, 32768], [128, 512, 2048]
    got = run_distributed(_window, 4, seqs, windows)
    print("| S | W | halo bytes/rank | halo calls | ring bytes/rank | ring calls | all-gather bytes/rank | "
          "all-gather calls |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in seqs:
        for window in windows:
            cells = []
            for name in WINDOW_METHODS:
                per_rank = [r[(seq, window, name)] for r in got]
                cells += [f"{max(b for b, _ in per_rank) / 2**10:.0f} KiB", str(max(c for _, c in per_rank))]
            print(f"| {seq} | {window} | " + " | ".join(cells) + " |")
    print()
    print("| CP | tree: rounds fwd+bwd | tree: max sent/rank | tree: max messages/rank | all-gather: contributed/rank "
          "| all-gather: received and held/rank |")
    print("|---|---|---|---|---|---|")
    for world in (2, 4, 8):
        res = run_distributed(_scan, world, 0)
        t = [r["tree"] for r in res]
        a = res[0]["allgather"]
        print(f"| {world} | {max(x[2] for x in t)} (2 x {scan_rounds(world)}) | {max(x[0] for x in t) / 2**10:.0f} KiB | "
              f"{max(x[1] for x in t)} | {a[0] / 2**10:.0f} KiB | {a[0] * world / 2**10:.0f} KiB |")

if __name__ == "__main__":
    main()
