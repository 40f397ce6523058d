"""Shared rank function for the softmax SP tests: many cases per distributed call, errors and comm counts back.

Every case draws fresh inputs (the seed comes from the test), runs the SP method on this rank's shard
under `record_comm`, gathers output and gradients with `unshard_sequence`, and compares them with the
single-process reference attention on the unsharded tensors.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from lctrain.ops.attention import attention
from lctrain.parallel import MeshConfig, init_mesh, record_comm
from lctrain.sp import allgather_attention, ring_attention, shard_sequence, ulysses_attention, unshard_sequence

METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}


def default_cases(world: int) -> list[tuple]:
    """(dtype, causal, heads, kv_heads, layout) covering MHA, GQA and MQA, both layouts, both dtypes."""
    h = 6 if world == 3 else 4
    head_sets = [(h, h), (h, h // 2), (h, 1)]
    return [(dt, causal, h_, hk, layout) for dt, causal, (h_, hk), layout
            in itertools.product(["float64", "float32"], [True, False], head_sets, ["zigzag", "contiguous"])]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): the scaled error that `lctrain.testing.compare` bounds."""
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def run_cases(method: str, cases: list[tuple], seed: int, seq: int = 24, batch: int = 2, dim: int = 8,
              softmax_scale: float | None = None) -> list[dict]:
    """Runs on every rank; returns one dict per case with errors, local K/V bytes and per-phase comm summaries."""
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    fn = METHODS[method]
    out = []
    for i, (dtype_name, causal, h, hk, layout) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(seed + i)
        q = torch.randn(batch, seq, h, dim, generator=g, dtype=dtype)
        k = torch.randn(batch, seq, hk, dim, generator=g, dtype=dtype)
        v = torch.randn(batch, seq, hk, dim, generator=g, dtype=dtype)
        do = torch.randn(batch, seq, h, dim, generator=g, dtype=dtype)
        # The reference runs in float64 on the same (rounded) inputs: for bf16 the error measured is the SP
        # method's own, not the sum of two bf16 computations.
        ref = [x.clone().double().requires_grad_(True) for x in (q, k, v)]
        o_ref = attention(*ref, causal=causal, softmax_scale=softmax_scale, backend="reference")
        o_ref.backward(do.double())

        local = [shard_sequence(x, layout=layout).detach().requires_grad_(True) for x in (q, k, v)]
        do_local = shard_sequence(do, layout=layout)
        with record_comm() as fwd:
            o_local = fn(*local, causal=causal, softmax_scale=softmax_scale, layout=layout)
        with record_comm() as bwd:
            o_local.backward(do_local)
        full = [unshard_sequence(t.detach(), layout=layout) for t in (o_local, *(x.grad for x in local))]
        # The first call of a signature exchanges it once (tests/sp/test_hot_path.py covers steady state).
        fwd_summary = fwd.summary()
        agreement = fwd_summary.pop("all_gather_object", {"calls": 0})["calls"]
        expect = [o_ref.detach()] + [x.grad for x in ref]
        out.append(dict(
            case=(dtype_name, causal, h, hk, layout),
            errors={n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), full, expect)},
            kv_bytes=local[1].numel() * local[1].element_size() * 2,
            fwd=fwd_summary, bwd=bwd.summary(), agreement=agreement,
        ))
    return out


TOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2}


def assert_results(results_per_rank: list[list[dict]]) -> None:
    """Every rank, every case: output and gradients within the dtype's tolerance."""
    for rank, results in enumerate(results_per_rank):
        for r in results:
            tol = TOL[r["case"][0]]
            bad = {n: e for n, e in r["errors"].items() if not e <= tol}
            assert not bad, f"rank {rank} case {r['case']}: errors {bad} exceed {tol}"
            assert r["agreement"] <= 1, f"rank {rank} case {r['case']}: {r['agreement']} agreement exchanges"
