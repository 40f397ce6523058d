"""Packed documents (`cu_seqlens=`) in the linear SP methods: LASP-2 / LASP-1 linear attention (no decay, `[h]`
decay, `[b, s, h]` and `[b, s, h, dk]` gates) and the gated delta rule equal the token-by-token recurrence run
on every document separately (outputs and the gradients of q, k, v, gates and beta; float64, 1e-10 relative per
head), on worlds 1-4 and both layouts (LASP-1: contiguous), with random document lengths (length 1, documents
longer than a rank's shard, documents across the zigzag fold, b = 2); the collectives are those of the same call
without documents; the steady state makes no host syncs; bad inputs raise on every rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gla_ref import gla_recurrent
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import lasp1_linear_attention, lasp2_delta_attention, lasp2_linear_attention
from lctrain.sp.documents import PackedDocuments
from lctrain.sp.lasp1_delta import lasp1_delta_attention
from lctrain.testing import run_distributed
from lctrain.testing.hot_path import count_host_syncs, watch_collectives
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close

B, H, DK, DV, S_PER_RANK = 2, 2, 3, 4, 8

#: (method, gate kind, layout).
CONFIGS = [("lasp2", gate, layout) for gate in ("none", "head", "scalar", "vector")
           for layout in ("contiguous", "zigzag")]
CONFIGS += [("lasp2_delta", gate, layout) for gate in ("scalar", "head") for layout in ("contiguous", "zigzag")]
CONFIGS += [("lasp1", "none", "contiguous"), ("lasp1", "head", "contiguous"), ("lasp1", "vector", "contiguous"),
            ("lasp1_delta", "scalar", "contiguous")]


def make_cu_seqlens(gen: torch.Generator, b: int, s: int) -> torch.Tensor:
    """Boundaries over b rows of s tokens: every row end; row 0 a length-1 document at a random place and a few
    random cuts; row 1 (if any) a length-1 document, then one document over all the rest (longer than any rank's
    shard for world > 1, across the zigzag fold at s/2)."""
    cuts = {s * r for r in range(b + 1)}
    if b > 1:
        cuts.add(s + 1)
    for r in range(min(b, 1)):
        one = int(torch.randint(0, s - 1, (1,), generator=gen))
        cuts |= {r * s + one, r * s + one + 1}  # a document of length 1
        n_more = int(torch.randint(0, 3, (1,), generator=gen))
        cuts |= {r * s + int(x) for x in torch.randint(1, s, (n_more,), generator=gen)}
    return torch.tensor(sorted(cuts), dtype=torch.int64)


def reference(method, q, k, v, g, beta, cu):
    """The recurrence on each document of the flattened batch separately, concatenated back to `[b, s, ...]`."""
    b, s = q.shape[:2]
    per_token = g is not None and g.dim() >= 3
    flat = [x.reshape(1, b * s, *x.shape[2:]) if x is not None else None for x in (q, k, v, beta)]
    gf = g.reshape(1, b * s, *g.shape[2:]) if per_token else g
    outs = []
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd, bd = (x[:, a:e] if x is not None else None for x in flat)
        gd = gf[:, a:e] if per_token else gf
        if method.endswith("delta"):
            outs.append(gated_delta_rule_recurrent(qd, kd, vd, gd, bd)[0])
        else:
            outs.append(gla_recurrent(qd, kd, vd, gd)[0])
    return torch.cat(outs, dim=1).reshape(b, s, *outs[0].shape[2:])


def call(method, layout, q, k, v, g, beta, cu):
    kw = {"cu_seqlens": cu} if cu is not None else {}
    if method == "lasp2":
        return lasp2_linear_attention(q, k, v, g, layout=layout, **kw)
    if method == "lasp1":
        return lasp1_linear_attention(q, k, v, g, **kw)
    if method == "lasp2_delta":
        return lasp2_delta_attention(q, k, v, beta, g, layout=layout, **kw)
    return lasp1_delta_attention(q, k, v, beta, g, **kw)


def _collectives(rec: comm.CommRecorder) -> dict:
    return {op: v["calls"] for op, v in rec.summary().items() if op != "all_gather_object"}


def _check(cfg, seed):
    method, gate, layout = cfg
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)
    n = S_PER_RANK * world
    delta = method.endswith("delta")
    q, k, v = make_qkv(gen, B, n, H, DK, DV, normalize_k=delta)
    g = make_gate(gate, gen, B, n, H, DK, low=0.02, high=0.5)
    beta = torch.rand(B, n, H, generator=gen, dtype=torch.float64) if delta else None
    cu = make_cu_seqlens(gen, B, n)
    w = torch.randn(B, n, H, DV, generator=gen, dtype=torch.float64)

    names = ["q", "k", "v", "g", "beta"]
    full = [q, k, v, g, beta]
    ref_leaves = [x.clone().requires_grad_(True) if x is not None else None for x in full]
    ref_o = reference(method, *ref_leaves, cu)
    present = [i for i, x in enumerate(ref_leaves) if x is not None]
    ref_grads = torch.autograd.grad((ref_o * w).sum(), [ref_leaves[i] for i in present])

    def sharded(x):
        return shard_sequence(x, dim=1, layout=layout) if x is not None and x.dim() >= 3 else x

    results = {}
    docs = PackedDocuments.from_host(cu, B, n, rank, world, layout, "cpu")  # as the model builds it per batch
    for with_docs in (False, True, "tables"):
        loc = [sharded(x).detach().clone().requires_grad_(True) if x is not None else None for x in full]
        with comm.record_comm() as rec:
            o = call(method, layout, *loc, {False: None, True: cu, "tables": docs}[with_docs])
            (o * sharded(w)).sum().backward()
        results[with_docs] = (o, loc, _collectives(rec))
    # The per-batch tables give exactly what the method derives from the bare boundaries.
    assert torch.equal(results["tables"][0], results[True][0])
    assert all(a is None or torch.equal(a.grad, b.grad) for a, b in zip(results["tables"][1], results[True][1]))
    o, loc, counts = results[True]
    where = f"rank {rank}/{world} {cfg} cu={cu.tolist()}"
    assert counts == results[False][2], (where, counts, results[False][2])  # the same collectives as without
    if world > 1 and method.startswith("lasp2"):
        assert counts == {"all_gather": 2}, (where, counts)
    per_head_close(o, sharded(ref_o), 2, 1e-10, f"o {where}")
    for i, want in zip(present, ref_grads):
        grad = loc[i].grad
        if names[i] == "g" and gate == "head":
            per_head_close(comm.all_reduce(grad.clone()), want, 0, 1e-10, f"dg {where}")  # per-rank shares
        else:
            per_head_close(grad, sharded(want), 2, 1e-10, f"d{names[i]} {where}")
    return True


def _all_configs(seed):
    init_mesh(MeshConfig(cp=dist.get_world_size()))
    for i, cfg in enumerate(CONFIGS):
        _check(cfg, seed + i)
    return True


@pytest.mark.parametrize("world", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_packed_documents_match_per_document_recurrence(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    assert all(run_distributed(_all_configs, world, seed))


def _reset_gate_is_exact(seed):
    """Every token a document of length 1 (a reset everywhere) and gates near 0: all finite, o = q . k v^T."""
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    gen = torch.Generator().manual_seed(seed)
    n = S_PER_RANK * world
    q, k, v = make_qkv(gen, 1, n, H, DK, DV)
    g = make_gate("scalar", gen, 1, n, H, DK, low=0.0, high=1e-6)
    cu = torch.arange(n + 1)
    loc = [shard_sequence(x, dim=1, layout="zigzag").requires_grad_(True) for x in (q, k, v, g)]
    o = lasp2_linear_attention(*loc, layout="zigzag", cu_seqlens=cu)
    o.sum().backward()
    want = torch.einsum("bshk,bshk,bshv->bshv", loc[0], loc[1], loc[2])
    assert torch.equal(o, want) or (o - want).abs().max() < 1e-14
    assert all(torch.isfinite(x.grad).all() for x in loc)
    assert bool((loc[3].grad == 0).all())  # a gate that never acts has no gradient
    return True


def test_reset_everywhere_is_exact_and_finite():
    assert all(run_distributed(_reset_gate_is_exact, 2, 3))


def _steady_state(seed):
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    gen = torch.Generator().manual_seed(seed)
    n = S_PER_RANK * world
    q, k, v = make_qkv(gen, 1, n, H, DK, DV, dtype=torch.float32, normalize_k=True)
    g = make_gate("scalar", gen, 1, n, H, DK, dtype=torch.float32)
    beta = torch.rand(1, n, H, generator=gen)
    cu = make_cu_seqlens(gen, 1, n)
    out = {}
    for method, layout in (("lasp2", "zigzag"), ("lasp2_delta", "contiguous"), ("lasp1", "contiguous")):
        loc = [shard_sequence(x, dim=1, layout=layout).requires_grad_(True) for x in (q, k, v, g, beta)]
        call(method, layout, *loc, cu).sum().backward()  # warm-up: the one agreement exchange
        with count_host_syncs() as syncs:
            with watch_collectives() as fwd:
                loss = call(method, layout, *loc, cu).sum()
            with watch_collectives() as bwd:
                loss.backward()
        out[(method, layout)] = (dict(fwd.counts), dict(bwd.counts), list(syncs.calls))
    return rank, out


def test_steady_state_no_host_syncs():
    for rank, out in run_distributed(_steady_state, 2, 11):
        for (method, layout), (fwd, bwd, syncs) in out.items():
            assert syncs == [], (method, layout, rank, syncs)
            if method == "lasp1":
                assert fwd == bwd == {"batch_isend_irecv": 1}, (method, rank, fwd, bwd)
            else:
                assert fwd == bwd == {"all_gather_single": 1}, (method, rank, fwd, bwd)


def _bad_inputs():
    init_mesh(MeshConfig(cp=dist.get_world_size()))
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 1, 8, H, DK, DV)
    cu = torch.tensor([0, 3, 8 * dist.get_world_size()])
    errors = {}
    cases = {
        "non-causal": lambda: lasp2_linear_attention(q, k, v, causal=False, cu_seqlens=cu),
        "float boundaries": lambda: lasp2_linear_attention(q, k, v, cu_seqlens=cu.double()),
        "initial state": lambda: lasp2_delta_attention(q, k, v, torch.rand(1, 8, H), cu_seqlens=cu,
                                                       initial_state=torch.zeros(1, H, DK, DV, dtype=q.dtype)),
        "lasp1 non-causal": lambda: lasp1_linear_attention(q, k, v, causal=False, cu_seqlens=cu),
    }
    for name, fn in cases.items():
        try:
            fn()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    comm.barrier()
    return errors


def test_bad_inputs_fail_on_every_rank():
    expected = {"non-causal": "needs causal=True", "float boundaries": "int32 or int64",
                "initial state": "initial_state and cu_seqlens", "lasp1 non-causal": "needs causal=True"}
    for errors in run_distributed(_bad_inputs, 2):
        for name, pattern in expected.items():
            assert errors[name] is not None and pattern in errors[name], (name, errors[name])
