"""LASP-2 with the tree scan (`scan="tree"`) equals the all-gather version and the token-by-token recurrence --
output, final state, gradients of q, k, v, gates, beta and the initial state -- for the plain, fixed-decay,
scalar-gated, vector-gated and delta-rule recurrences, both layouts, packed documents, on worlds 2, 3, 4, 5, 8;
every call takes ceil(log2 P) point-to-point rounds forward and backward, each message O(1) maps."""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gla_ref import gla_recurrent
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import lasp2_delta_attention, lasp2_linear_attention
from lctrain.sp.lasp2_delta import lasp2_chunk_map_attention
from lctrain.sp.lasp2_scan import scan_rounds
from lctrain.testing import run_distributed
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close

B, H, DK, DV, S_PER_RANK = 2, 2, 3, 2, 4

#: (variant, gate kind, layout, initial state, final state, packed documents). "plain" goes through
#: lasp2_linear_attention (no gate or a fixed [h] decay), the others through the chunk-map entry points.
CONFIGS = [
    ("delta", "scalar", "contiguous", True, True, False),
    ("delta", "scalar", "zigzag", True, True, False),
    ("delta", "head", "zigzag", False, False, False),
    ("scalar", "scalar", "zigzag", True, True, False),
    ("vector", "vector", "contiguous", False, True, False),
    ("vector", "vector", "zigzag", True, False, False),
    ("plain", "none", "zigzag", False, False, False),
    ("plain", "head", "contiguous", False, False, False),
    ("delta", "scalar", "zigzag", False, False, True),
    ("plain", "scalar", "contiguous", False, False, True),
]


def _run(cfg, loc, layout, scan, cu):
    variant, gate, _, _, with_final, _ = cfg
    q, k, v, g, beta, s0 = loc
    if variant == "plain":
        return lasp2_linear_attention(q, k, v, g, layout=layout, cu_seqlens=cu, scan=scan)
    if variant == "delta":
        return lasp2_delta_attention(q, k, v, beta, log_decay=g, layout=layout, initial_state=s0,
                                     output_final_state=with_final, cu_seqlens=cu, scan=scan)
    return lasp2_chunk_map_attention(q, k, v, g, None, variant, layout=layout, initial_state=s0,
                                     output_final_state=with_final, cu_seqlens=cu, scan=scan)


def _check(cfg, seed):
    variant, gate, layout, with_init, with_final, docs = cfg
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)
    n = S_PER_RANK * world
    q, k, v = make_qkv(gen, B, n, H, DK, DV, normalize_k=variant == "delta")
    g = make_gate(gate, gen, B, n, H, DK, low=0.05, high=0.9)
    beta = torch.rand(B, n, H, generator=gen, dtype=torch.float64) if variant == "delta" else None
    s0 = torch.randn(B, H, DK, DV, generator=gen, dtype=torch.float64) if with_init else None
    w = torch.randn(B, n, H, DV, generator=gen, dtype=torch.float64)
    wf = torch.randn(world, B, H, DK, DV, generator=gen, dtype=torch.float64)  # rank r's weight on the final state
    cu = None
    if docs:
        cuts = sorted(set(torch.randint(1, B * n, (4,), generator=gen).tolist()) | set(range(n, B * n, n)))
        cu = torch.tensor([0] + cuts + [B * n])
    names = ["q", "k", "v", "g", "beta", "s0"]
    full = [q, k, v, g, beta, s0]
    present = [i for i, x in enumerate(full) if x is not None]

    results = {}
    for scan in ("allgather", "tree"):
        loc = [shard_sequence(x, dim=1, layout=layout) if (x is not None and x.dim() >= 3 and i < 5) else x
               for i, x in enumerate(full)]
        loc = [x.detach().clone().requires_grad_(True) if x is not None else None for x in loc]
        with comm.record_comm() as rec:
            out = _run(cfg, loc, layout, scan, cu)
            o, final = out if with_final else (out, None)
            loss = (o * shard_sequence(w, dim=1, layout=layout)).sum()
            if with_final:
                loss = loss + (final * wf[rank]).sum()
            loss.backward()
        grads = {}
        for i in present:
            grad = loc[i].grad
            if names[i] == "s0" or (names[i] == "g" and gate == "head"):
                grad = comm.all_reduce(grad.clone())  # replicated: the sum over the CP ranks is the gradient
            grads[names[i]] = grad
        results[scan] = (o.detach(), final, grads, rec)

    try:  # a mismatch is returned, not raised: the other ranks go on to the next configuration's collectives
        _compare(cfg, rank, world, results, full, names, present, w, wf)
        error = None
    except AssertionError as err:
        error = str(err)
    rec = results["tree"][3]
    # Communication of the tree version: point-to-point only, per round and direction one message.
    rounds = {"fwd": set(), "bwd": set()}
    biggest = 0
    for e in rec.events:
        if e.op == "all_gather_object":
            continue
        assert e.op in ("send", "recv"), (cfg, e)
        phase, k = re.search(r"\.(fwd|bwd)\.round(\d+)", e.tag).groups()
        rounds[phase].add(int(k))
        biggest = max(biggest, e.bytes)
    return dict(rounds=rounds, biggest=biggest, sends=rec.calls("send"), error=error)


def _compare(cfg, rank, world, results, full, names, present, w, wf):
    variant, gate, layout, with_init, with_final, docs = cfg
    where = f"rank {rank}/{world} {cfg}"
    o_t, f_t, g_t, _ = results["tree"]
    o_a, f_a, g_a, _ = results["allgather"]
    # Against the all-gather version: the same numbers up to float64 rounding.
    per_head_close(o_t, o_a, 2, 1e-12, f"o vs allgather {where}")
    if with_final:
        per_head_close(f_t, f_a, 1, 1e-12, f"final vs allgather {where}")
    for name in g_t:
        head_dim = 1 if name == "s0" else (0 if name == "g" and gate == "head" else 2)
        per_head_close(g_t[name], g_a[name], head_dim, 1e-11, f"d{name} vs allgather {where}")
    if not docs:  # against the recurrence on the whole sequence (documents: tests/sp/test_linear_varlen.py)
        leaves = [x.clone().requires_grad_(True) if x is not None else None for x in full]
        if variant == "delta":
            ref_o, ref_f = gated_delta_rule_recurrent(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        else:
            ref_o, ref_f = gla_recurrent(*leaves[:4], initial_state=leaves[5], output_final_state=True)
        ref_loss = (ref_o * w).sum() + ((ref_f * wf.sum(0)).sum() if with_final else 0)
        ref_grads = dict(zip([names[i] for i in present], torch.autograd.grad(ref_loss, [leaves[i] for i in present])))
        per_head_close(o_t, shard_sequence(ref_o.detach(), dim=1, layout=layout), 2, 1e-10, f"o {where}")
        if with_final:
            per_head_close(f_t, ref_f, 1, 1e-10, f"final {where}")
        for name, grad in g_t.items():
            replicated = name == "s0" or (name == "g" and gate == "head")
            want = ref_grads[name] if replicated else shard_sequence(ref_grads[name], dim=1, layout=layout)
            head_dim = 1 if name == "s0" else (0 if name == "g" and gate == "head" else 2)
            per_head_close(grad, want, head_dim, 1e-10, f"d{name} {where}")


def _all_configs(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    return [_check(cfg, seed + i) for i, cfg in enumerate(CONFIGS)]


def _assert_scan(world, per_rank):
    want = set(range(scan_rounds(world)))
    for i, cfg in enumerate(CONFIGS):
        variant, _, layout, _, _, _ = cfg
        stats = [r[i] for r in per_rank]
        assert not [s["error"] for s in stats if s["error"]], [s["error"] for s in stats]
        for phase in ("fwd", "bwd"):
            # ceil(log2 P) rounds in all; no rank takes part in more.
            assert set().union(*(s["rounds"][phase] for s in stats)) == want, (cfg, phase, stats)
        # One message is at most two maps (|T| + dk dv each) and one state (the final state's gradient).
        t = {"delta": DK * DK, "vector": DK}.get(variant, 1)
        assert max(s["biggest"] for s in stats) <= B * H * (2 * (t + DK * DV) + DK * DV) * 8, (cfg, stats)
        # Per rank and call: at most two sends per round (up and down) each way.
        assert max(s["sends"] for s in stats) <= 2 * 2 * len(want), (cfg, stats)


@pytest.mark.parametrize("world", [2, 3, 4, pytest.param(5, marks=pytest.mark.slow),
                                   pytest.param(8, marks=pytest.mark.slow)])
def test_tree_scan_matches_allgather_and_recurrence(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    _assert_scan(world, run_distributed(_all_configs, world, seed))


def _bytes(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for scan in ("allgather", "tree"):
        gen = torch.Generator().manual_seed(seed)
        q, k, v = make_qkv(gen, 1, 2 * world, 2, 4, 4, normalize_k=True)
        g = make_gate("scalar", gen, 1, 2 * world, 2, 4)
        beta = torch.rand(1, 2 * world, 2, generator=gen, dtype=torch.float64)
        loc = [shard_sequence(x, dim=1).requires_grad_(True) for x in (q, k, v, g, beta)]
        with comm.record_comm() as rec:
            o = lasp2_delta_attention(loc[0], loc[1], loc[2], loc[4], log_decay=loc[3], layout="zigzag", scan=scan)
            o.sum().backward()
        out[scan] = (rec.bytes(), rec.calls())
    return out


def test_tree_bytes_grow_with_log_p_not_p():
    """World 4, zigzag delta rule: the all-gather moves 2 maps per rank in (and receives P x that); the tree at most
    2 rounds x (up + down) messages of <= 2 maps each way."""
    seed = int(torch.randint(0, 2**31, ()).item())
    per_map = 1 * 2 * (4 * 4 + 4 * 4) * 8
    for out in run_distributed(_bytes, 4, seed):
        tree_bytes, tree_calls = out["tree"]
        assert tree_bytes <= 2 * scan_rounds(4) * 2 * 2 * per_map, out
        assert tree_calls <= 2 * scan_rounds(4) * 4, out  # sends + receives, both directions, fwd and bwd


def test_bad_scan_is_a_value_error():
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown scan"):
        lasp2_linear_attention(x, x, x, scan="ring")
    with pytest.raises(ValueError, match="causal"):
        lasp2_linear_attention(x, x, x, causal=False, scan="tree")


def _steady_state(seed):
    from lctrain.testing.hot_path import count_host_syncs, count_syncing_ops, watch_collectives

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layout in ("zigzag", "contiguous"):
        for docs in (False, True):
            n = 4 * world
            q, k, v = make_qkv(gen, 1, n, 2, 3, 2, dtype=torch.float32, normalize_k=True)
            g = make_gate("scalar", gen, 1, n, 2, 3, dtype=torch.float32)
            beta = torch.rand(1, n, 2, generator=gen)
            loc = [shard_sequence(x, dim=1, layout=layout).requires_grad_(True) for x in (q, k, v, g, beta)]
            cu = torch.tensor([0, 3, n - 2, n]) if docs else None

            def run():
                return lasp2_delta_attention(loc[0], loc[1], loc[2], loc[4], log_decay=loc[3], layout=layout,
                                             cu_seqlens=cu, scan="tree")
            run().sum().backward()  # warm-up: the signature's one agreement exchange
            with count_syncing_ops() as ops, count_host_syncs() as syncs:
                with watch_collectives() as fwd:
                    o = run()
                with watch_collectives() as bwd:
                    o.sum().backward()
            out[(layout, docs)] = (dict(fwd.counts), dict(bwd.counts), ops.calls + list(syncs.calls))
    return out


def test_tree_steady_state_rounds_only_no_syncs():
    """World 4, after the first call: exactly ceil(log2 4) = 2 batched P2P rounds forward and 2 backward, nothing
    else, no host sync or syncing op (documents included)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for out in run_distributed(_steady_state, 4, seed):
        for case, (fwd, bwd, syncs) in out.items():
            assert fwd == {"batch_isend_irecv": 2} and bwd == {"batch_isend_irecv": 2}, (case, fwd, bwd)
            assert syncs == [], (case, syncs)
