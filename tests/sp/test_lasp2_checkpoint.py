"""LASP-2 layers under non-reentrant activation checkpointing: the layer's forward runs once more in backward
(one extra forward all-gather, not one per tensor of LASP-2's kept graph), one backward all-gather, and the
gradients equal the un-checkpointed run (float64, world 2)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import lasp2_delta_attention, lasp2_linear_attention
from lctrain.testing import run_distributed
from lctrain.testing.compare import assert_close

B, H, DK, DV, S_PER_RANK = 2, 2, 3, 4, 6

#: (layer, layout): plain and [h]-decayed linear attention (the kept-graph path), a [b, s, h] gate and the
#: gated delta rule (the chunk-map path); inputs are built in `_inputs`.
CASES = [(name, layout) for name in ("plain", "decay", "gated", "delta") for layout in ("contiguous", "zigzag")]


def _inputs(name: str, layout: str, seed: int) -> tuple[list[torch.Tensor], object, str]:
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    s = S_PER_RANK * world
    q, k, v = (torch.randn(B, s, H, d, generator=gen, dtype=torch.float64) for d in (DK, DK, DV))
    shard = [shard_sequence(x, dim=1, layout=layout) for x in (q, k, v)]
    if name == "plain":
        return shard, lambda q, k, v: lasp2_linear_attention(q, k, v, layout=layout), "lasp2"
    if name == "decay":
        ld = -(0.05 + 0.9 * torch.rand(H, generator=gen, dtype=torch.float64))
        return shard + [ld], lambda q, k, v, g: lasp2_linear_attention(q, k, v, g, layout=layout), "lasp2"
    g = torch.nn.functional.logsigmoid(torch.randn(B, s, H, generator=gen, dtype=torch.float64) + 2)
    g = shard_sequence(g, dim=1, layout=layout)
    if name == "gated":
        return shard + [g], lambda q, k, v, g: lasp2_linear_attention(q, k, v, g, layout=layout), "lasp2"
    beta = shard_sequence(torch.rand(B, s, H, generator=gen, dtype=torch.float64), dim=1, layout=layout)
    shard[1] = torch.nn.functional.normalize(shard[1], dim=-1)
    return (shard + [g, beta], lambda q, k, v, g, b: lasp2_delta_attention(q, k, v, b, g, layout=layout),
            "lasp2_delta")


def _run(seed: int) -> bool:
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    for i, (name, layout) in enumerate(CASES):
        inputs, fn, tag = _inputs(name, layout, seed + i)
        w = torch.randn(B, S_PER_RANK, H, DV, generator=torch.Generator().manual_seed(seed - i), dtype=torch.float64)
        results = {}
        for mode in ("plain", "checkpoint"):
            leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
            with comm.record_comm() as rec:
                if mode == "plain":
                    o = fn(*leaves)
                else:
                    o = checkpoint(fn, *leaves, use_reentrant=False)
                fwd = rec.calls("all_gather", f"{tag}.fwd")
                (o * w).sum().backward()
            results[mode] = (o.detach(), [x.grad for x in leaves], fwd, rec.calls("all_gather", f"{tag}.fwd"),
                             rec.calls("all_gather", f"{tag}.bwd"))
        where = f"{name} {layout} rank {dist.get_rank()}/{world}"
        o_ref, g_ref, *counts_ref = results["plain"]
        o_ck, g_ck, *counts_ck = results["checkpoint"]
        assert counts_ref == [1, 1, 1], (where, counts_ref)
        # Checkpointed: 1 forward all-gather, then exactly one recompute in backward, and 1 backward all-gather.
        assert counts_ck == [1, 2, 1], (where, counts_ck)
        assert_close(o_ck, o_ref, f"o {where}", rtol=1e-12, atol=1e-12)
        for j, (a, b) in enumerate(zip(g_ck, g_ref)):
            # A [h] decay's gradient is per rank (the CP sum is the full gradient): compare per rank as well.
            assert_close(a, b, f"grad {j} {where}", rtol=1e-12, atol=1e-12)
    return True


def test_checkpointed_lasp2_recomputes_once_with_the_same_gradients():
    seed = int(torch.randint(0, 2**31, ()).item())
    assert all(run_distributed(_run, 2, seed))
