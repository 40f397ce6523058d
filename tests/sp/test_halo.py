"""Halo attention (sliding window under CP) equals the single-process masked definition, outputs and gradients,
and sends only the W - 1 preceding keys/values per chunk: bytes flat in the sequence length, proportional to W."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lctrain.parallel import MeshConfig, init_mesh, record_comm
from lctrain.sp import halo_attention, shard_sequence, unshard_sequence
from lctrain.sp.halo import halo_plan
from lctrain.testing import run_distributed


def masked_window_reference(q, k, v, window, scale, cu_seqlens=None):
    """The definition: softmax over keys i - W < j <= i (same document), plain PyTorch, autograd."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    i = torch.arange(s)
    mask = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < window)
    mask = mask[None].expand(b, s, s)
    if cu_seqlens is not None:
        flat = torch.arange(b)[:, None] * s + i[None, :]
        doc = torch.searchsorted(cu_seqlens, flat, right=True)
        mask = mask & (doc[:, :, None] == doc[:, None, :])
    kr = k.repeat_interleave(h // hk, dim=2)
    vr = v.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vr)


def rel_err(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _cases(seed: int, cases: list[tuple]) -> list[dict]:
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = []
    for n, (seq, h, hk, window, layout, docs) in enumerate(cases):
        g = torch.Generator().manual_seed(seed + n)
        b, d = 2, 4
        q = torch.randn(b, seq, h, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, seq, hk, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, seq, hk, d, generator=g, dtype=torch.float64)
        do = torch.randn(b, seq, h, d, generator=g, dtype=torch.float64)
        cu = None
        if docs:
            cuts = sorted(set(torch.randint(1, b * seq, (4,), generator=g).tolist()) | {seq, 2 * seq - 1})
            cu = torch.tensor([0] + cuts + [b * seq])
        ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
        o_ref = masked_window_reference(*ref, window, 0.4, cu)
        o_ref.backward(do)
        local = [shard_sequence(x, layout=layout).detach().requires_grad_(True) for x in (q, k, v)]
        with record_comm() as fwd:
            o = halo_attention(*local, window=window, layout=layout, cu_seqlens=cu, softmax_scale=0.4)
        with record_comm() as bwd:
            o.backward(shard_sequence(do, layout=layout))
        full = [unshard_sequence(t.detach(), layout=layout) for t in (o, *(x.grad for x in local))]
        expect = [o_ref.detach()] + [x.grad for x in ref]
        out.append(dict(case=(seq, h, hk, window, layout, docs),
                        errors={nm: rel_err(a, e) for nm, a, e in zip(("o", "dq", "dk", "dv"), full, expect)},
                        fwd_send=fwd.bytes("send"), bwd_send=bwd.bytes("send"),
                        fwd_ops={e.op for e in fwd.events} - {"all_gather_object"},
                        row_bytes=2 * b * hk * d * 8))
    return out


def _all_cases(world: int) -> list[tuple]:
    seq = 24
    cases = []
    for layout in ("contiguous", "zigzag"):
        c = seq // world // (2 if layout == "zigzag" and world > 1 else 1)
        for window in sorted({1, max(2, c - 1), c + 2, 2 * c + 1, seq + 5}):
            cases.append((seq, 4, 2 if window % 2 else 1, window, layout, False))
        cases.append((seq, 4, 2, c + 2, layout, True))
        cases.append((seq, 2, 2, 3, layout, True))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_halo_matches_masked_reference(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, results in enumerate(run_distributed(_cases, world, seed, _all_cases(world))):
        for r in results:
            bad = {n: e for n, e in r["errors"].items() if not e <= 1e-10}
            assert not bad, (rank, r["case"], bad)
            seq, _, _, window, layout, _ = r["case"]
            plan = halo_plan(rank, world, seq // world, window, layout)
            # Exactly the planned halo rows go on the wire (K and V); backward returns the received rows' dK/dV.
            assert r["fwd_send"] == plan.sent_rows() * r["row_bytes"], (r["case"], r["fwd_send"])
            assert r["bwd_send"] == plan.received_rows() * r["row_bytes"], r["case"]
            assert r["fwd_ops"] <= {"send", "recv"}, r["fwd_ops"]


def _bytes(seed: int, seqs: list[int], windows: list[int], layout: str) -> dict:
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for seq in seqs:
        for window in windows:
            x = torch.randn(1, seq // world, 2, 8, dtype=torch.float32)
            with record_comm() as rec:
                halo_attention(x, x, x, window=window, layout=layout)
            out[(seq, window)] = rec.bytes("send")
    return out


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_halo_bytes_flat_in_sequence_and_proportional_to_window(layout):
    """World 4: x1 vs x8 the sequence, the same bytes per rank; 2x the window (W - 1 = 4 -> 8), 2x the bytes."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, got in enumerate(run_distributed(_bytes, 4, seed, [128, 1024], [5, 9], layout)):
        assert got[(128, 5)] == got[(1024, 5)] and got[(128, 9)] == got[(1024, 9)], (rank, got)
        assert got[(128, 9)] == 2 * got[(128, 5)], (rank, got)
        # W - 1 rows of K and V (float32, 2 kv heads x 8) per remote successor chunk, nothing more.
        chunks = 1 if layout == "contiguous" else 2
        assert got[(128, 5)] <= chunks * 4 * 2 * 2 * 8 * 4, (rank, got)
    total = sum(halo_plan(r, 4, 1024 // 4, 5, layout).sent_rows() for r in range(4))
    assert total == (3 if layout == "contiguous" else 6) * 4  # every boundary between two ranks carries W - 1


def test_halo_bad_window_is_a_value_error():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="window"):
        halo_attention(x, x, x, window=0)
    with pytest.raises(ValueError, match="causal"):
        halo_attention(x, x, x, window=3, causal=False)


def _full_methods(seed: int, cases: list[tuple]) -> list[dict]:
    """ring / allgather with window=: exact, and only the visible boxes of blocks computed (area counted)."""
    from lctrain.sp import allgather as allgather_mod, allgather_attention, ring as ring_mod, ring_attention

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    area = [0]

    def counting(fn):
        def wrapped(q, k, *args, **kwargs):
            area[0] += q.shape[1] * k.shape[1]
            return fn(q, k, *args, **kwargs)
        return wrapped

    out = []
    patched = [(ring_mod, "varlen_attention_forward"), (allgather_mod, "varlen_attention_forward")]
    saved = [getattr(m, n) for m, n in patched]
    for m, n in patched:
        setattr(m, n, counting(getattr(m, n)))
    try:
        for i, (method, seq, window, layout, docs) in enumerate(cases):
            fn = ring_attention if method == "ring" else allgather_attention
            g = torch.Generator().manual_seed(seed + i)
            q = torch.randn(2, seq, 4, 4, generator=g, dtype=torch.float64)
            k, v = (torch.randn(2, seq, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
            do = torch.randn(2, seq, 4, 4, generator=g, dtype=torch.float64)
            cu = torch.tensor([0, 5, seq, seq + 3, 2 * seq]) if docs else None
            ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
            masked_window_reference(*ref, window, 0.5, cu).backward(do)
            local = [shard_sequence(x, layout=layout).detach().requires_grad_(True) for x in (q, k, v)]
            area[0] = 0
            o = fn(*local, window=window, layout=layout, cu_seqlens=cu, softmax_scale=0.5)
            fwd_area = area[0]
            o.backward(shard_sequence(do, layout=layout))
            full = [unshard_sequence(t.detach(), layout=layout) for t in (o, *(x.grad for x in local))]
            expect = [masked_window_reference(*[x.detach() for x in ref], window, 0.5, cu)] + [x.grad for x in ref]
            out.append(dict(case=(method, seq, window, layout, docs), area=fwd_area,
                            errors={nm: rel_err(a, e) for nm, a, e in zip(("o", "dq", "dk", "dv"), full, expect)}))
    finally:
        for (m, n), fn in zip(patched, saved):
            setattr(m, n, fn)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_allgather_with_window_skip_blocks_outside_it(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    seq = 32
    cases = [(m, seq, w, layout, docs) for m in ("ring", "allgather") for layout in ("contiguous", "zigzag")
             for w, docs in ((1, False), (3, False), (9, True), (seq + 1, False))]
    for rank, results in enumerate(run_distributed(_full_methods, world, seed, cases)):
        for r in results:
            bad = {n: e for n, e in r["errors"].items() if not e <= 1e-10}
            assert not bad, (rank, r["case"], bad)
            _, _, window, layout, _ = r["case"]
            s = seq // world
            if window <= 3:  # the local diagonal plus at most two (W-1) x (W-1) boxes: remote blocks skipped
                assert 0 < r["area"] <= s * s + 2 * (window - 1) ** 2, (rank, r["case"], r["area"])


def _steady_state(seed: int) -> dict:
    from lctrain.testing.hot_path import count_host_syncs, count_syncing_ops, watch_collectives

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layout in ("zigzag", "contiguous"):
        for docs in (False, True):
            full = [torch.randn(2, 8 * world, 2, 4, generator=g) for _ in range(4)]
            q, k, v, do = (shard_sequence(x, layout=layout) for x in full)
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
            cu = torch.tensor([0, 3, 8 * world + 5, 16 * world]) if docs else None
            halo_attention(q, k, v, window=5, layout=layout, cu_seqlens=cu).backward(do)  # warm-up
            with count_syncing_ops() as ops, count_host_syncs() as syncs:
                with watch_collectives() as fwd:
                    o = halo_attention(q, k, v, window=5, layout=layout, cu_seqlens=cu)
                with watch_collectives() as bwd:
                    o.backward(do)
            out[(layout, docs)] = (dict(fwd.counts), dict(bwd.counts), ops.calls + list(syncs.calls))
    return out


def test_halo_steady_state_one_exchange_each_way_no_syncs():
    """After the first call of a signature: one batched P2P exchange forward, one backward, nothing else, and no
    host sync or syncing op (documents included)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for out in run_distributed(_steady_state, 2, seed):
        for case, (fwd, bwd, syncs) in out.items():
            assert fwd == {"batch_isend_irecv": 1} and bwd == {"batch_isend_irecv": 1}, (case, fwd, bwd)
            assert syncs == [], (case, syncs)
