"""The SP hot path in steady state: only the algorithm's collectives (counted on torch.distributed itself), no
host syncs, the agreement exchange once per signature, communication issued before the compute it overlaps,
and every method runnable under FakeTensorMode with the fake backend (the planner's simulation)."""
import os

import pytest
import torch
import torch.distributed as dist

import lctrain.ops.linear_attention as la
from lctrain.ops.linear_attention import default_log_decay, register_linear_attention_backend
from lctrain.ops.linear_attention_ref import linear_attention_ref
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.sp import (allgather_attention, lasp1_linear_attention, lasp2_linear_attention, ring_attention,
                        ulysses_attention)
from lctrain.sp.utils import clear_agreement_cache
from lctrain.testing import run_distributed
from lctrain.testing.hot_path import count_host_syncs, graph_saved_bytes, track_saved_tensors, watch_collectives

LINEAR = ("lasp2", "lasp2_noncausal", "lasp1")
SOFTMAX = ("ring", "allgather", "ulysses")


def _call(method, q, k, v, ld, layout):
    if method == "lasp2":
        return lasp2_linear_attention(q, k, v, ld, layout=layout)
    if method == "lasp2_noncausal":
        return lasp2_linear_attention(q, k, v, causal=False, layout=layout)
    if method == "lasp1":
        return lasp1_linear_attention(q, k, v, ld)
    fn = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}[method]
    return fn(q, k, v, layout=layout)


def expected_calls(method, rank, world):
    """torch.distributed calls per (forward, backward) that the algorithm names, nothing else."""
    if world == 1:
        return {}, {}
    if method.startswith("lasp2"):
        return {"all_gather_single": 1}, {"all_gather_single": 1}
    if method == "lasp1":
        n = int(rank > 0) + int(rank < world - 1)  # receive from r-1, send to r+1 (reverse in backward)
        return {"batch_isend_irecv": n}, {"batch_isend_irecv": n}
    if method == "ring":
        # K/V move P-1 times forward; backward K/V P-1 times and the dK/dV accumulators P times.
        return {"batch_isend_irecv": world - 1}, {"batch_isend_irecv": 2 * world - 1}
    if method == "allgather":
        # Backward re-gathers K/V and reduce-scatters dK/dV (gloo: an all-reduce).
        return {"all_gather_single": 1}, {"all_gather_single": 1, "all_reduce": 1}
    return {"all_to_all": 3}, {"all_to_all": 3}  # ulysses: q, k/v, o forward; their gradients backward


def _steady_state(methods, seed):
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for method in methods:
        for layout in (("contiguous",) if method == "lasp1" else ("zigzag", "contiguous")):
            full = [torch.randn(1, 8 * world, 4, 8, generator=g) for _ in range(4)]
            q, k, v, do = (shard_sequence(x, layout=layout) for x in full)
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
            ld = default_log_decay(4).requires_grad_(True) if method in ("lasp2", "lasp1") else None
            _call(method, q, k, v, ld, layout).backward(do)  # warm-up: the signature's one agreement exchange
            with count_host_syncs() as syncs:
                with watch_collectives() as fwd:
                    o = _call(method, q, k, v, ld, layout)
                with watch_collectives() as bwd:
                    o.backward(do)
            out[(method, layout)] = (dict(fwd.counts), dict(bwd.counts), list(syncs.calls))
    return rank, out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("methods", [LINEAR, SOFTMAX], ids=["linear", "softmax"])
def test_steady_state_issues_only_the_algorithms_collectives_and_no_host_syncs(methods, world):
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, out in run_distributed(_steady_state, world, methods, seed):
        for (method, layout), (fwd, bwd, syncs) in out.items():
            where = (method, layout, f"rank {rank}/{world}")
            assert (fwd, bwd) == expected_calls(method, rank, world), (where, fwd, bwd)
            assert syncs == [], (where, syncs)


def _agreement_once():
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    q = torch.randn(1, 4, 2, 8)
    counts = []
    for _ in range(2):
        with comm.record_comm() as rec, watch_collectives() as calls:
            lasp2_linear_attention(q, q, q)
            ring_attention(q, q, q)
        counts.append((rec.calls("all_gather_object"), calls.counts.get("all_gather_object", 0)))
    clear_agreement_cache()
    os.environ["LCTRAIN_SP_CHECK_RANKS"] = "0"
    try:
        with watch_collectives() as calls:
            lasp2_linear_attention(q, q, q)
        counts.append((0, calls.counts.get("all_gather_object", 0)))
    finally:
        del os.environ["LCTRAIN_SP_CHECK_RANKS"]
    return counts


def test_agreement_exchange_once_per_signature_and_counted():
    for counts in run_distributed(_agreement_once, 2):
        # First call of each of the two signatures: one counted object all-gather each; then none.
        assert counts == [(2, 2), (0, 0), (0, 0)], counts


def _lasp2_order(seed):
    """Event order with a logging local backend: the all-gather is issued before the intra-chunk compute."""
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    log = []

    class _Logged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            log.append(("compute", "intra.fwd"))
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            log.append(("compute", "intra.bwd"))
            return grad

    def logging_backend(q, k, v, log_decay=None, initial_state=None, output_final_state=False):
        o, s = linear_attention_ref(q, k, v, log_decay, initial_state, output_final_state)
        return _Logged.apply(o), s

    register_linear_attention_backend("logging", logging_backend)
    orders = {}
    try:
        with la.use_linear_attention_backend("logging"):
            for layout in ("zigzag", "contiguous"):
                g = torch.Generator().manual_seed(seed)
                q, k, v = (shard_sequence(torch.randn(1, 8 * world, 2, 4, generator=g), layout=layout)
                           .requires_grad_(True) for _ in range(3))
                ld = default_log_decay(2).requires_grad_(True)
                lasp2_linear_attention(q, k, v, ld, layout=layout).sum().backward()  # warm-up
                with watch_collectives() as calls:
                    log.clear()
                    calls.events = log  # one ordered log for collectives and compute
                    o = lasp2_linear_attention(q, k, v, ld, layout=layout)
                    o.sum().backward()
                orders[layout] = list(log)
    finally:
        la.REGISTRY.unregister("logging")
    return orders


def test_lasp2_issues_its_all_gather_before_the_intra_chunk_compute():
    seed = int(torch.randint(0, 2**31, ()).item())
    for orders in run_distributed(_lasp2_order, 2, seed):
        for layout, events in orders.items():
            # Backward recomputes the intra-chunk term (inputs kept, not its graph) while its all-gather is in flight.
            assert events == [("issue", "all_gather_single"), ("compute", "intra.fwd"), ("wait", "all_gather_single"),
                              ("issue", "all_gather_single"), ("compute", "intra.fwd"), ("compute", "intra.bwd"),
                              ("wait", "all_gather_single")], (layout, events)


def test_every_method_runs_under_fake_tensors_and_the_fake_backend(fake_group):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    clear_agreement_cache()
    with FakeTensorMode(allow_non_fake_inputs=True), comm.record_comm() as rec:
        for method in LINEAR + SOFTMAX:
            for layout in (("contiguous",) if method == "lasp1" else ("zigzag", "contiguous")):
                q, k, v = (torch.randn(1, 64, 4, 16, requires_grad=True) for _ in range(3))
                ld = default_log_decay(4).requires_grad_(True) if method in ("lasp2", "lasp1") else None
                o = _call(method, q, k, v, ld, layout)
                o.sum().backward()
                assert isinstance(o, FakeTensor) and o.shape == (1, 64, 4, 16), method
                assert isinstance(q.grad, FakeTensor) and q.grad.shape == q.shape, method
                if method in SOFTMAX:  # packed documents too (the planner may simulate packed batches)
                    cu = torch.tensor([0, 5, 100, 256])
                    fn = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}
                    o = fn[method](q, k, v, layout=layout, cu_seqlens=cu)
                    o.sum().backward()
                    assert isinstance(o, FakeTensor) and o.shape == q.shape, method
    # No agreement exchange on the fake backend (it has no object collectives).
    assert rec.calls("all_gather_object") == 0, rec.summary()


def _saved_bytes(seqs):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for method in LINEAR + SOFTMAX:
        for layout in (("contiguous",) if method == "lasp1" else ("zigzag", "contiguous")):
            for seq in seqs:
                q, k, v = (shard_sequence(torch.randn(1, seq, 4, 4), layout=layout).clone().requires_grad_(True)
                           for _ in range(3))
                ld = default_log_decay(4).requires_grad_(True) if method in ("lasp2", "lasp1") else None
                with track_saved_tensors() as saved:  # the layer's inputs included: its graph holds them
                    o = _call(method, q, k, v, ld, layout)
                # The graph walk also sees tensors saved under nested hooks (LASP-2's kept intra-chunk graph).
                walked = graph_saved_bytes(o)
                assert walked >= saved.bytes, (method, walked, saved.bytes)
                del o
                out[(method, layout, seq)] = walked
    return out


def test_saved_activations_scale_with_the_local_sequence():
    """What a layer keeps for backward is O(S/P): bytes(S, P) = a S/P + c with a small constant c, so doubling S
    at fixed P doubles it and doubling P at fixed S halves it, up to c."""
    two = run_distributed(_saved_bytes, 2, (1024, 2048))  # S/P = 512, 1024
    four = run_distributed(_saved_bytes, 4, (2048,))  # S/P = 512
    for (method, layout, seq) in two[0]:
        if seq != 1024:
            continue
        small = max(r[(method, layout, 1024)] for r in two)
        large = max(r[(method, layout, 2048)] for r in two)
        wider = max(r[(method, layout, 2048)] for r in four)
        const = 2 * small - large  # c of the linear model
        where = (method, layout, small, large, wider)
        assert 0 <= const <= 0.15 * small, where
        # The same S/P on twice the ranks keeps the same bytes (up to per-rank states that grow with P: 1%).
        assert abs(wider - small) <= 0.01 * small, where


def _allgather_order(seed):
    """Event order with a logging local backend: the K/V gather is issued before the diagonal blocks."""
    from lctrain.ops import attention as attn

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    ref = attn.attention_backends()["reference"]
    log = []

    def fwd(q, k, v, causal, scale):
        log.append(("compute", "fwd.causal" if causal else "fwd"))
        return ref.forward(q, k, v, causal, scale)

    def bwd(do, q, k, v, o, lse, causal, scale):
        log.append(("compute", "bwd.causal" if causal else "bwd"))
        return ref.backward(do, q, k, v, o, lse, causal, scale)

    attn.register_attention_backend("logging", fwd, bwd, lambda *case: True, priority=0)
    orders = {}
    try:
        with attn.use_attention_backend("logging"):
            for layout in ("zigzag", "contiguous"):
                g = torch.Generator().manual_seed(seed)
                q, k, v = (shard_sequence(torch.randn(1, 8 * world, 2, 4, generator=g), layout=layout)
                           .requires_grad_(True) for _ in range(3))
                allgather_attention(q, k, v, layout=layout).sum().backward()  # warm-up
                with watch_collectives() as calls:
                    log.clear()
                    calls.events = log
                    allgather_attention(q, k, v, layout=layout).sum().backward()
                orders[layout] = list(log)
    finally:
        attn.REGISTRY.unregister("logging")
    return dist.get_rank(), orders


def test_allgather_issues_its_gather_before_the_diagonal_blocks():
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, orders in run_distributed(_allgather_order, 2, seed):
        for layout, events in orders.items():
            fwd = events[:events.index(("wait", "all_gather_single")) + 1]
            assert fwd == [("issue", "all_gather_single"), ("compute", "fwd.causal"), ("wait", "all_gather_single")], \
                (rank, layout, events)
            rest = events[len(fwd):]
            start = rest.index(("issue", "all_gather_single"))  # the backward's re-gather
            assert rest[start:start + 3] == [("issue", "all_gather_single"), ("compute", "bwd.causal"),
                                             ("wait", "all_gather_single")], (rank, layout, events)
            assert rest[-2:] == [("issue", "all_reduce"), ("wait", "all_reduce")], (rank, layout, events)


def _model_syncs():
    from lctrain.models import ModelConfig, build_model
    from lctrain.models.rope import rope_cos_sin

    mesh = init_mesh(MeshConfig(tp=1, cp=2))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2, ffn_hidden_size=64,
                      layer_pattern="LLLA")
    torch.manual_seed(0)
    model = build_model(cfg, mesh, "zigzag")
    pos = shard_sequence(torch.arange(32), dim=0, layout="zigzag")
    ids = torch.randint(0, 64, (1, 16))
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    out = {}
    for name, layer in (("linear block", model.layers[0]), ("softmax block", model.layers[3]), ("model", None)):
        def step():
            if layer is None:
                model(ids, pos, ids).loss_sum.backward()
            else:
                layer(torch.randn(1, 16, 32, requires_grad=True), cos, sin, None).sum().backward()
        step()  # warm-up
        with count_host_syncs() as syncs, watch_collectives() as calls:
            step()
        out[name] = (syncs.calls, calls.counts)
    return out


def test_model_blocks_and_step_make_no_host_syncs():
    for out in run_distributed(_model_syncs, 2):
        assert all(syncs == [] for syncs, _ in out.values()), out
        # A block issues its SP method's collectives only (tiny model: LASP-2 blocks, an all-gather K/V block).
        assert out["linear block"][1] == {"all_gather_single": 2}, out
        assert out["softmax block"][1] == {"all_gather_single": 2, "all_reduce": 1}, out


def test_syncing_op_detector_names_each_denied_op_and_its_line():
    """The deny-list check the steady-state tests rely on: each syncing op is caught (with this file's line), the
    sync-free equivalents the SP methods use are not."""
    from lctrain.testing.hot_path import count_syncing_ops

    x = torch.randn(4, 3, requires_grad=True)
    mask, reps = torch.tensor([True, False, True, False]), torch.tensor([1, 2])
    planted = {
        "isin": lambda: torch.isin(torch.arange(4), reps), "unique": lambda: torch.unique(reps),
        "nonzero": lambda: mask.nonzero(), "item": lambda: x.sum().item(), "bool": lambda: bool(mask.any()),
        "mask index": lambda: x[mask], "mask assign": lambda: x.detach().clone().__setitem__(mask, torch.ones(2, 3)),
        "repeat_interleave": lambda: torch.repeat_interleave(reps), "bincount": lambda: torch.bincount(reps),
        "masked_select": lambda: x.masked_select(mask[:, None]),
    }
    for name, fn in planted.items():
        with count_syncing_ops() as ops:
            fn()
        assert ops.count >= 1 and all("test_hot_path.py" in c for c in ops.calls), (name, ops.calls)
    with count_syncing_ops() as ops:
        torch.searchsorted(torch.tensor([0, 3, 5]), torch.arange(5), right=True)
        torch.repeat_interleave(reps, output_size=3)
        x.repeat_interleave(2, dim=1)
        torch.where(mask[:, None], x, 0.0).sum().backward()
        x[:, torch.tensor([0, 2])].cumsum(1)
        x.detach().clone()[mask] = 0.0  # index_put's masked_fill path (a host scalar): no nonzero
    assert ops.calls == [], ops.calls


GATED = {"lasp2": ("none", "head", "scalar", "vector"), "lasp1": ("none", "head", "scalar", "vector"),
         "lasp2_delta": ("none", "head", "scalar"), "lasp1_delta": ("none", "head", "scalar")}


def _packed_call(method, layout, gate, packing, world, gen):
    """Inputs and a call of `method` on this rank's shard: `packing` is "none", "tensor" (cu_seqlens=) or
    "documents" (the batch's PackedDocuments, as the model passes it)."""
    from lctrain.sp import lasp2_delta_attention
    from lctrain.sp.documents import PackedDocuments
    from lctrain.sp.lasp1_delta import lasp1_delta_attention
    from tests.ops.gated_cases import make_gate

    b, s, h, d = 2, 8 * world, 2, 4
    full = [torch.randn(b, s, h, d, generator=gen) for _ in range(4)]
    q, k, v, do = (shard_sequence(x, layout=layout) for x in full)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    g = make_gate(gate, gen, b, s, h, d, dtype=torch.float32, low=0.01, high=0.5) if method in GATED else None
    g = g if g is None or g.dim() == 1 else shard_sequence(g, layout=layout)
    g = g.requires_grad_(True) if g is not None else None
    beta = shard_sequence(torch.rand(b, s, h, generator=gen), layout=layout) if method.endswith("delta") else None
    cu = torch.tensor([0, 3, 4, s - 5, s, s + 9, 2 * s])  # documents across ranks, the zigzag fold and rows
    kw = {}
    if packing == "tensor":
        kw["cu_seqlens"] = cu
    elif packing == "documents":
        kw["cu_seqlens"] = PackedDocuments.from_host(cu, b, s, dist.get_rank(), world, layout, q.device)

    def run():
        if method in ("ring", "allgather", "ulysses"):
            fn = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}[method]
            return fn(q, k, v, layout=layout, **kw)
        if method == "lasp2":
            return lasp2_linear_attention(q, k, v, g, layout=layout, **kw)
        if method == "lasp1":
            return lasp1_linear_attention(q, k, v, g, **kw)
        if method == "lasp2_delta":
            return lasp2_delta_attention(q, k, v, beta, g, layout=layout, **kw)
        return lasp1_delta_attention(q, k, v, beta, g, **kw)
    return run, do


def _syncing_ops_per_step(seed):
    from lctrain.testing.hot_path import count_syncing_ops

    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    out = {}
    for method in SOFTMAX + tuple(GATED):
        for gate in GATED.get(method, ("none",)):
            for layout in (("contiguous",) if method.startswith("lasp1") else ("zigzag", "contiguous")):
                outputs = {}
                for packing in ("none", "tensor", "documents"):
                    run, do = _packed_call(method, layout, gate, packing, world, torch.Generator().manual_seed(seed))
                    run().backward(do)  # warm-up: the signature's one agreement exchange
                    with count_syncing_ops() as ops, count_host_syncs() as syncs:
                        o = run()
                        o.backward(do)
                    outputs[packing] = o.detach()
                    out[(method, gate, layout, packing)] = ops.calls + syncs.calls
                # The tables built once per batch give the very numbers the SP method derives from the tensor.
                assert torch.equal(outputs["tensor"], outputs["documents"]), (method, gate, layout)
    return out


def test_steady_state_step_has_no_syncing_ops_for_every_method_gate_and_packing():
    """Every SP method x gate kind x (no packing, cu_seqlens tensor, PackedDocuments), fwd + bwd after a warm-up:
    no aten op whose CUDA kernel syncs (isin, nonzero, boolean-mask indexing, ...) and no host read."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for out in run_distributed(_syncing_ops_per_step, 2, seed):
        assert len(out) == 3 * (3 * 2 + 4 * 2 + 4 + 3 * 2 + 3), len(out)
        bad = {case: calls for case, calls in out.items() if calls}
        assert not bad, bad


def _packed_model_step():
    from lctrain.models import ModelConfig, build_model
    from lctrain.sp.documents import PackedDocuments
    from lctrain.testing.hot_path import count_syncing_ops

    mesh = init_mesh(MeshConfig(tp=1, cp=2))
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, num_kv_heads=2, ffn_hidden_size=64,
                      layer_pattern="LDGA")
    torch.manual_seed(0)
    model = build_model(cfg, mesh, "zigzag")
    pos = shard_sequence(torch.arange(32), dim=0, layout="zigzag")
    ids = torch.randint(0, 64, (2, 16))
    cu = torch.tensor([0, 5, 6, 20, 32, 45, 64])  # documents across ranks, the zigzag fold and the two rows
    out = {}
    for name in ("tensor", "documents"):
        def step():
            # The data path builds the tables before the step (from_host: host reads of host boundaries).
            docs = cu if name == "tensor" else PackedDocuments.from_host(cu, 2, 32, mesh.cp_rank, 2, "zigzag", "cpu")
            with count_syncing_ops() as ops:
                model(ids, pos, ids, cu_seqlens=docs).loss_sum.backward()
            return ops
        step()  # warm-up
        ops = step()
        out[name] = ops.calls
    return out


def test_packed_model_step_has_no_syncing_ops():
    """A CP=2 step of a model with linear, gated delta, GLA and softmax layers on a packed batch, the boundaries
    given as a host tensor or as the prebuilt PackedDocuments: no syncing op anywhere in forward or backward."""
    for out in run_distributed(_packed_model_step, 2):
        assert out == {"tensor": [], "documents": []}, out
