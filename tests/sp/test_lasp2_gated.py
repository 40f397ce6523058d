"""LASP-2 (and the LASP-1 baseline) for gated recurrences (the gated delta rule; gated linear attention with
data-dependent gates) equals the token-by-token recurrence on the unsharded sequence -- output, final state and
the gradients of q, k, v, gates, beta and the initial state -- on worlds 1-4, both layouts, with one all-gather
forward and one backward whose size does not depend on the sequence length; bad inputs fail on every rank before
any collective; the steady state issues nothing else and never synchronises the host.

Every configuration of a world size runs inside one `run_distributed` call (spawning ranks is the slow part).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from lctrain.ops.debug import debug_checks
from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gla_ref import gla_recurrent
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import lasp1_linear_attention, lasp2_delta_attention, lasp2_linear_attention
from lctrain.sp.lasp1_delta import lasp1_chunk_map_attention
from lctrain.sp.lasp2_delta import lasp2_chunk_map_attention
from lctrain.testing import run_distributed
from lctrain.testing.hot_path import count_host_syncs, watch_collectives
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close

B, H, DK, DV, S_PER_RANK = 2, 2, 3, 4, 6

#: (variant, gate kind, layout, dtype, with initial state, with final state); every input requires grad.
CONFIGS = [
    ("delta", "scalar", "contiguous", torch.float64, True, True),
    ("delta", "scalar", "zigzag", torch.float64, True, True),
    ("delta", "scalar", "contiguous", torch.float64, True, False),  # one rank: the map-free path
    ("scalar", "scalar", "contiguous", torch.float64, False, False),
    ("delta", "head", "zigzag", torch.float64, False, False),
    ("delta", "none", "contiguous", torch.float64, False, True),
    ("scalar", "scalar", "contiguous", torch.float64, True, True),
    ("scalar", "scalar", "zigzag", torch.float64, False, False),
    ("vector", "vector", "contiguous", torch.float64, False, True),
    ("vector", "vector", "zigzag", torch.float64, True, True),
    ("delta", "scalar", "zigzag", torch.float32, True, True),
    ("vector", "vector", "zigzag", torch.bfloat16, False, False),
]


#: LASP-1 runs on the contiguous layout and returns no final state.
LASP1_CONFIGS = [
    ("delta", "scalar", "contiguous", torch.float64, True, False),
    ("scalar", "scalar", "contiguous", torch.float64, True, False),
    ("vector", "vector", "contiguous", torch.float64, False, False),
]


def _sharded(x, layout):
    return shard_sequence(x, dim=1, layout=layout)


def _check(cfg, seed, method="lasp2"):
    """Compare LASP-2 (or LASP-1) on this rank's shard to the float64 recurrence on the full sequence; return the
    recorder."""
    variant, gate, layout, dtype, with_init, with_final = cfg
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)  # identical full tensors on every rank
    n = S_PER_RANK * world
    q, k, v = make_qkv(gen, B, n, H, DK, DV, normalize_k=variant == "delta")
    g = make_gate(gate, gen, B, n, H, DK, low=0.05, high=0.9)
    beta = torch.rand(B, n, H, generator=gen, dtype=torch.float64) if variant == "delta" else None
    s0 = torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64) if with_init else None
    w = torch.randn(B, n, H, DV, generator=gen, dtype=torch.float64)
    wf_all = torch.randn(world, B, H, DK, DV, generator=gen, dtype=torch.float64)  # rank r's weight on the final state

    names = ["q", "k", "v", "g", "beta", "s0"]
    full = [q, k, v, g, beta, s0]
    ref_leaves = [x.to(dtype).double().requires_grad_(True) if x is not None else None for x in full]
    if variant == "delta":
        ref_o, ref_f = gated_delta_rule_recurrent(*ref_leaves[:5], initial_state=ref_leaves[5],
                                                  output_final_state=True)
    else:
        ref_o, ref_f = gla_recurrent(*ref_leaves[:4], initial_state=ref_leaves[5], output_final_state=True)
    ref_loss = (ref_o * w).sum() + ((ref_f * wf_all.sum(0)).sum() if with_final else 0)
    present = [i for i, x in enumerate(ref_leaves) if x is not None]
    ref_grads = dict(zip([names[i] for i in present], torch.autograd.grad(ref_loss, [ref_leaves[i] for i in present])))

    loc = [_sharded(x, layout) if (x is not None and x.dim() >= 3) else x for x in full[:5]] + [s0]
    loc = [x.to(dtype).detach().requires_grad_(True) if x is not None else None for x in loc]
    with comm.record_comm() as rec:
        public = variant != "delta" and not with_init and not with_final  # through lasp{1,2}_linear_attention
        if method == "lasp1" and public:
            out = lasp1_linear_attention(*loc[:4])
        elif method == "lasp1":
            out = lasp1_chunk_map_attention(*loc[:5], variant, initial_state=loc[5])
        elif public:
            out = lasp2_linear_attention(*loc[:4], layout=layout)
        elif variant == "delta":
            out = lasp2_delta_attention(loc[0], loc[1], loc[2], loc[4], log_decay=loc[3], layout=layout,
                                        initial_state=loc[5], output_final_state=with_final)
        else:
            out = lasp2_chunk_map_attention(*loc[:5], variant, layout=layout, initial_state=loc[5],
                                            output_final_state=with_final)
        o, final = out if with_final else (out, None)
        loss = (o.double() * _sharded(w, layout)).sum()
        if with_final:
            loss = loss + (final.double() * wf_all[rank]).sum()
        loss.backward()

    rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    where = f"rank {rank}/{world} {cfg}"
    assert o.dtype == dtype and o.shape == (B, S_PER_RANK, H, DV), where
    per_head_close(o, _sharded(ref_o, layout), 2, rtol, f"o {where}")
    if with_final:
        assert final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), where
        per_head_close(final, ref_f, 1, rtol, f"final {where}")
    for i in present:
        name, x = names[i], loc[i]
        grad = x.grad.double()
        if name == "s0" or (name == "g" and gate == "head"):
            grad = comm.all_reduce(grad.clone())  # replicated inputs: the sum over CP ranks is the gradient
            want = ref_grads[name]
        else:
            want = _sharded(ref_grads[name], layout)
        head_dim = 1 if name == "s0" else (0 if name == "g" and gate == "head" else 2)
        per_head_close(grad, want, head_dim, rtol * (10 if dtype != torch.float64 else 1), f"d{name} {where}")
    return rec


def _all_configs(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    for i, cfg in enumerate(CONFIGS):
        rec = _check(cfg, seed + i)
        tag = "lasp2_delta" if cfg[0] == "delta" else "lasp2"
        if world == 1:
            assert rec.calls("all_gather") == 0, rec.summary()
        else:
            # One all-gather each way (a first call per signature may add its one metadata exchange).
            assert rec.calls("all_gather", f"{tag}.fwd") == 1 and rec.calls("all_gather", f"{tag}.bwd") == 1, \
                (cfg, rec.events)
            assert set(rec.summary()) <= {"all_gather", "all_gather_object"}, rec.summary()
            assert rec.calls("all_gather") == 2, rec.summary()
    # LASP-1 (contiguous, no final state): the state passed serially, P-1 sends each way in all.
    for i, cfg in enumerate(LASP1_CONFIGS):
        rec = _check(cfg, seed + 100 + i, method="lasp1")
        sends = rec.calls("send", "lasp1")
        total = comm.all_reduce(torch.tensor(float(sends)))
        assert int(total) == 2 * (world - 1), (cfg, rec.summary())
        assert set(rec.summary()) <= {"send", "recv", "all_gather_object"}, rec.summary()
    return True


@pytest.mark.parametrize("world", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_lasp2_gated_matches_recurrence(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    assert all(run_distributed(_all_configs, world, seed))


def _bytes_vs_length(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for variant in ("delta", "scalar", "vector"):
        for layout in ("contiguous", "zigzag"):
            for s_per_rank in (4, 32, 4):  # x1, x8, then x1 again with a warm signature
                gen = torch.Generator().manual_seed(seed)
                n = s_per_rank * world
                q, k, v = make_qkv(gen, 1, n, 2, 3, 4, dtype=torch.float32, normalize_k=True)
                g = make_gate("vector" if variant == "vector" else "scalar", gen, 1, n, 2, 3, dtype=torch.float32)
                beta = torch.rand(1, n, 2, generator=gen) if variant == "delta" else None
                loc = [_sharded(x, layout).requires_grad_(True) if x is not None else None for x in (q, k, v, g, beta)]
                with comm.record_comm() as rec:
                    lasp2_chunk_map_attention(*loc, variant, layout=layout).sum().backward()
                out[(variant, layout, s_per_rank)] = rec.summary()
    return out


def test_bytes_do_not_grow_with_sequence():
    """Per rank: forward n_loc * b * h * (|T| + dk dv) float32, backward the same (the state gradients and the
    rank's own T, re-gathered instead of keeping the gathered T from forward); a warm call issues exactly these
    two all-gathers and nothing else."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for out in run_distributed(_bytes_vs_length, 2, seed):
        for variant, t_size in (("delta", 3 * 3), ("scalar", 1), ("vector", 3)):
            for layout, n_loc in (("contiguous", 1), ("zigzag", 2)):
                fwd = n_loc * 1 * 2 * (t_size + 3 * 4) * 4
                bwd = n_loc * 1 * 2 * (t_size + 3 * 4) * 4
                want = {"all_gather": {"calls": 2, "bytes": fwd + bwd}}
                x1, x8, warm = (out[(variant, layout, s)] for s in (4, 32, 4))
                assert warm == want, (variant, layout, warm, want)
                assert x1["all_gather"] == x8["all_gather"] == want["all_gather"], (variant, layout, x1, x8)


def _bad_inputs():
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    b, h, dk, dv = 1, 2, 3, 4

    def inputs(s=4, dk=dk):
        q, k = torch.randn(b, s, h, dk), torch.randn(b, s, h, dk)
        return q, k, torch.randn(b, s, h, dv), torch.rand(b, s, h)

    def positive_gate():
        q, k, v, beta = inputs(s=6)
        g = -torch.rand(b, 6, h)
        if rank == 0:
            g[0, 1, 1] = 0.3
        with debug_checks():  # value checks are a host sync: only on request
            return lasp2_delta_attention(q, k, v, beta, log_decay=g)

    cases = {
        "gate shape": lambda: lasp2_delta_attention(*inputs(), log_decay=torch.zeros(b, 4, h + 1)),
        "vector gate for delta": lambda: lasp2_delta_attention(*inputs(s=8), log_decay=torch.zeros(b, 8, h, dk)),
        "beta shape": lambda: lasp2_delta_attention(*inputs(s=10)[:3], torch.rand(b, 10)),
        "uneven split": lambda: lasp2_delta_attention(*inputs(s=12 if rank == 0 else 11)),
        "odd zigzag": lambda: lasp2_delta_attention(*inputs(s=5), layout="zigzag"),
        "positive gate (debug)": positive_gate,
        "initial state shape": lambda: lasp2_delta_attention(*inputs(s=14), initial_state=torch.zeros(b, h, dk, dk)),
    }
    errors = {}
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
        lasp2_delta_attention(*inputs()).sum()  # the group is still in step
    return errors


EXPECTED = {
    "gate shape": "log gate g must be",
    "vector gate for delta": "not a vector gate",
    "beta shape": "beta must be",
    "uneven split": "differ between CP ranks",
    "odd zigzag": "not divisible by 2\\*CP",
    "positive gate (debug)": "rank 0 of the CP group: log gates must be finite and <= 0",
    "initial state shape": "initial_state must be",
}


def test_bad_inputs_fail_on_every_rank():
    for rank, errors in enumerate(run_distributed(_bad_inputs, 2)):
        for name, pattern in EXPECTED.items():
            assert errors[name] is not None and re.search(pattern, errors[name]), (rank, name, errors[name])


def _steady_state(seed):
    """After a warm-up call per signature: only the algorithm's collectives on torch.distributed, no host syncs."""
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    gen = torch.Generator().manual_seed(seed)
    n = 8 * world
    q, k, v = make_qkv(gen, 1, n, 2, 3, 4, dtype=torch.float32, normalize_k=True)
    gs = make_gate("scalar", gen, 1, n, 2, 3, dtype=torch.float32)
    gv = make_gate("vector", gen, 1, n, 2, 3, dtype=torch.float32)
    beta = torch.rand(1, n, 2, generator=gen)
    s0 = torch.randn(1, 2, 3, 4, generator=gen)
    out = {}
    for name, layout in (("delta", "zigzag"), ("delta", "contiguous"), ("scalar", "zigzag"), ("vector", "zigzag"),
                         ("lasp1-delta", "contiguous")):
        g = gv if name == "vector" else gs
        loc = [_sharded(x, layout).requires_grad_(True) for x in (q, k, v, g, beta)]
        init = s0.clone().requires_grad_(True)

        def call():
            if name == "lasp1-delta":
                return lasp1_chunk_map_attention(*loc, "delta", initial_state=init)
            o, final = lasp2_chunk_map_attention(*loc[:4], loc[4] if name == "delta" else None, name, layout=layout,
                                                 initial_state=init, output_final_state=True)
            return o.sum() + final.sum()

        call().sum().backward()  # warm-up: the signature's one agreement exchange
        with count_host_syncs() as syncs:
            with watch_collectives() as fwd:
                loss = call().sum()
            with watch_collectives() as bwd:
                loss.backward()
        out[(name, layout)] = (dict(fwd.counts), dict(bwd.counts), list(syncs.calls))
    return rank, out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_steady_state_only_the_algorithms_collectives_no_host_syncs(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, out in run_distributed(_steady_state, world, seed):
        for (name, layout), (fwd, bwd, syncs) in out.items():
            where = (name, layout, f"rank {rank}/{world}")
            assert syncs == [], where
            if name.startswith("lasp1"):
                n = int(rank > 0) + int(rank < world - 1)  # receive from r-1, send to r+1 (reverse in backward)
                assert fwd == bwd == {"batch_isend_irecv": n}, (where, fwd, bwd)
            else:
                assert fwd == bwd == {"all_gather_single": 1}, (where, fwd, bwd)


def test_runs_under_fake_tensors_and_the_fake_backend(fake_group):
    """The planner simulates the real code on FakeTensors with a fake process group: the gated methods must run
    there (no data-dependent host reads, no object collectives)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lctrain.sp.utils import clear_agreement_cache

    clear_agreement_cache()
    with FakeTensorMode(allow_non_fake_inputs=True), comm.record_comm() as rec:
        for name, layout in (("delta", "zigzag"), ("scalar", "contiguous"), ("vector", "zigzag"),
                             ("lasp1", "contiguous")):
            q, k, v = (torch.randn(1, 64, 2, 8, requires_grad=True) for _ in range(3))
            g = (-torch.rand(1, 64, 2, *((8,) if name == "vector" else ()))).requires_grad_(True)
            beta = torch.rand(1, 64, 2, requires_grad=True)
            if name == "lasp1":
                o = lasp1_chunk_map_attention(q, k, v, g, beta, "delta")
            else:
                o = lasp2_chunk_map_attention(q, k, v, g, beta if name == "delta" else None, name, layout=layout)
            o.sum().backward()
            assert isinstance(o, FakeTensor) and o.shape == (1, 64, 2, 8), name
            assert isinstance(q.grad, FakeTensor) and isinstance(g.grad, FakeTensor), name
    assert rec.calls("all_gather_object") == 0, rec.summary()


@pytest.mark.parametrize("variant", ["scalar", "vector", "delta"])
def test_affine_scan_equals_the_sequential_fold(variant):
    """The log-depth prefix scan gives the states of S_(c+1) = T_c S_c + M_c, c = 0 ... G-1, for any G (float64)."""
    from lctrain.sp.lasp2_delta import _apply, affine_scan

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    b, h, dk, dv = 2, 3, 4, 5
    for g in (1, 2, 3, 5, 8, 9):
        t_shape = {"scalar": (g, b, h), "vector": (g, b, h, dk), "delta": (g, b, h, dk, dk)}[variant]
        t = torch.rand(t_shape, generator=gen, dtype=torch.float64)
        if variant == "delta":
            t = t / dk  # contractive, as the gated delta rule's maps are
        m = torch.randn(g, b, h, dk, dv, generator=gen, dtype=torch.float64)
        state = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
        entering, final = affine_scan(t, m, state, variant)
        want = []
        for c in range(g):
            want.append(state)
            state = _apply(t[c], state, variant) + m[c]
        assert torch.allclose(entering, torch.stack(want), rtol=0, atol=1e-12), (variant, g)
        assert torch.allclose(final, state, rtol=0, atol=1e-12), (variant, g)
