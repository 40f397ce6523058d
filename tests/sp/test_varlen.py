"""Packed documents (`cu_seqlens=`): ring, all-gather K/V and Ulysses attend only within a document and equal
attention run on every document alone, unsharded (output and gradients, float64), for worlds 1-4, both layouts,
random document lengths including 1, documents longer than a rank's shard and documents across the zigzag fold;
the collectives stay those of the method, and a repeated call makes no host sync."""
import pytest
import torch
import torch.distributed as dist

from lctrain.ops.attention import attention
from lctrain.ops.attention_varlen import document_ids, document_mask, varlen_attention
from lctrain.parallel import MeshConfig, init_mesh, record_comm, shard_sequence, unshard_sequence
from lctrain.sp import allgather_attention, ring_attention, ulysses_attention
from lctrain.sp.documents import PackedDocuments
from lctrain.testing.hot_path import count_host_syncs
from tests.sp.softmax_cases import rel_err

METHODS = {"ring": ring_attention, "allgather": allgather_attention, "ulysses": ulysses_attention}


def random_documents(gen: torch.Generator, batch: int, seq: int, shard: int) -> torch.Tensor:
    """cu_seqlens over `batch` sequences of `seq` tokens: a 1-token document, one longer than a shard, random rest."""
    bounds = [0]
    for b in range(batch):
        start, end = b * seq, (b + 1) * seq
        cuts = {start + 1, start + 1 + shard + 1} if b == 0 else set()  # length 1, then longer than a shard
        n_random = int(torch.randint(1, 4, (1,), generator=gen))
        cuts |= {start + 1 + int(x) for x in torch.randint(0, seq - 1, (n_random,), generator=gen)}
        if b == 1:
            cuts.discard(start + seq // 2)  # a document across the zigzag fold (chunks P-1 and P)
        bounds += sorted(c for c in cuts if start < c < end) + [end]
    return torch.tensor(bounds, dtype=torch.int64)


def per_document_reference(q, k, v, cu, causal, scale):
    """Attention of every document alone (unsharded, reference backend), laid back end to end."""
    b, s = q.shape[:2]
    flat = [x.reshape(b * s, *x.shape[2:]) for x in (q, k, v)]
    outs = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (x[lo:hi][None] for x in flat)
        outs.append(attention(qd, kd, vd, causal=causal, softmax_scale=scale, backend="reference")[0])
    return torch.cat(outs).reshape(q.shape)


def _varlen_cases(seed, reference=False):
    from lctrain.ops import attention_varlen

    attention_varlen.REFERENCE_ONLY = reference  # this rank process only; reset below
    try:
        return _varlen_cases_inner(seed)
    finally:
        attention_varlen.REFERENCE_ONLY = False


def _varlen_cases_inner(seed):
    world = dist.get_world_size()
    init_mesh(MeshConfig(cp=world))
    b, seq, h, d = 2, 8 * world, 12, 4
    out = []
    for i, (method, layout, causal) in enumerate((m, lay, c) for m in METHODS for lay in ("zigzag", "contiguous")
                                                 for c in (True, False)):
        hk = 1 if method == "ulysses" and world == 3 else 2  # Ulysses: kv heads divisible by CP, or CP by them
        g = torch.Generator().manual_seed(seed + i)
        q, k, v = (torch.randn(b, seq, hh, d, generator=g, dtype=torch.float64) for hh in (h, hk, hk))
        do = torch.randn(b, seq, h, d, generator=g, dtype=torch.float64)
        cu = random_documents(g, b, seq, seq // world)
        ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
        per_document_reference(*ref, cu, causal, 0.3).backward(do)
        local = [shard_sequence(x, layout=layout).detach().requires_grad_(True) for x in (q, k, v)]
        with record_comm() as rec:
            o = METHODS[method](*local, causal=causal, softmax_scale=0.3, layout=layout, cu_seqlens=cu)
            o.backward(shard_sequence(do, layout=layout))
        first_grads = [x.grad.detach().clone() for x in local]
        # Steady state, with the per-batch tables the model passes (PackedDocuments): no host sync, and exactly
        # the numbers the bare boundaries gave.
        docs = PackedDocuments.from_host(cu, b, seq, dist.get_rank(), world, layout, "cpu")
        again = [x.detach().clone().requires_grad_(True) for x in local]
        with count_host_syncs() as syncs:
            o2 = METHODS[method](*again, causal=causal, softmax_scale=0.3, layout=layout, cu_seqlens=docs)
            o2.backward(shard_sequence(do, layout=layout))
        assert syncs.count == 0, (method, syncs.calls)
        assert torch.equal(o2, o) and all(torch.equal(a.grad, g) for a, g in zip(again, first_grads)), method
        full = [unshard_sequence(t, layout=layout) for t in (o.detach(), *first_grads)]
        errors = {n: rel_err(a, x) for n, a, x in zip(("o", "dq", "dk", "dv"), full, [None] + [r.grad for r in ref])
                  if x is not None}
        errors["o"] = rel_err(full[0], per_document_reference(q, k, v, cu, causal, 0.3))
        calls = rec.summary()
        calls.pop("all_gather_object", None)
        out.append(((method, layout, causal, cu.tolist()), errors, {op: c["calls"] for op, c in calls.items()}))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("reference", [False, True], ids=["fused", "definition"])
def test_packed_documents_match_per_document_attention(world, reference):
    from lctrain.testing import run_distributed

    if reference and world in (1, 3):
        pytest.skip("the plain definition runs at worlds 2 and 4 (the fused path everywhere)")
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, results in enumerate(run_distributed(_varlen_cases, world, seed, reference)):
        for case, errors, calls in results:
            bad = {n: e for n, e in errors.items() if not e <= 1e-10}
            assert not bad, (rank, world, case, errors)
            method = case[0]
            if world > 1:  # the method's own collectives, nothing more
                expect = {"ring": {"send", "recv"}, "allgather": {"all_gather", "reduce_scatter"},
                          "ulysses": {"all_to_all"}}[method]
                assert set(calls) == expect, (case, calls)


def test_document_mask_and_ids():
    cu = torch.tensor([0, 1, 4, 6, 8])  # batch 2 x 4 tokens: [0 | 1 1 1], [2 2 | 3 3]
    assert document_ids(cu, 2, 4).tolist() == [[0, 1, 1, 1], [2, 2, 3, 3]]
    assert document_ids(cu, 2, 4, torch.tensor([3, 0])).tolist() == [[1, 0], [3, 2]]
    pos = torch.arange(4)
    docs = document_ids(cu, 2, 4)
    mask = document_mask(pos, pos, docs, docs, causal=True)
    assert mask[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    # Single process: the differentiable op equals per-document attention.
    q, k, v = (torch.randn(2, 4, 2, 3, dtype=torch.float64) for _ in range(3))
    o = varlen_attention(q, k, v, pos, pos, docs, docs, True, 0.5)
    assert rel_err(o, per_document_reference(q, k, v, cu, True, 0.5)) <= 1e-12


def test_causal_work_per_rank():
    from lctrain.sp.utils import causal_work_per_rank

    # One document of 8 tokens over CP=2: zigzag chunks of 2 tokens, pairs 1+2 | 3+4 | 5+6 | 7+8.
    assert causal_work_per_rank([8], 2) == [3 + 15, 7 + 11]
    assert causal_work_per_rank([8], 2, layout="contiguous") == [1 + 2 + 3 + 4, 5 + 6 + 7 + 8]
    # Packed short documents: global zigzag gives rank 0 the documents' early tokens only ...
    assert causal_work_per_rank([2, 2, 2, 2], 2) == [3 + 3, 3 + 3]
    assert causal_work_per_rank([6, 1, 1], 2) == [1 + 2 + 1 + 1, 3 + 4 + 5 + 6]
    # ... while per-document zigzag splits every document over all ranks (a 6-token doc: chunks of 2).
    assert causal_work_per_rank([6, 1, 1], 2, per_document=True) == [(1 + 2) + 0 + 1 + 1, (3 + 4) + (5 + 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_cpu_path_equals_the_definition(monkeypatch, dtype):
    """The fused CPU kernel with an additive mask equals the plain definition, including a row that sees no key."""
    from lctrain.ops import attention_varlen as av

    g = torch.Generator().manual_seed(0)
    b, sq, sk, h, hk, d = 2, 6, 10, 4, 2, 8
    q, do = (torch.randn(b, sq, h, d, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, sk, hk, d, generator=g, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0, 3, 10, 13, 20])
    q_pos, k_pos = torch.arange(4, 10), torch.arange(10)
    mask = document_mask(q_pos, k_pos, document_ids(cu, b, 10, q_pos), document_ids(cu, b, 10, k_pos), True)
    mask[0, 0] = False  # a query that sees nothing
    results = {}
    for reference in (True, False):
        monkeypatch.setattr(av, "REFERENCE_ONLY", reference)
        o, lse = av.varlen_attention_forward(q, k, v, mask, 0.3)
        results[reference] = (o, lse, *av.varlen_attention_backward(do, q, k, v, o, lse, mask, 0.3))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, fused, ref in zip(("o", "lse", "dq", "dk", "dv"), results[False], results[True]):
        assert torch.equal(torch.isinf(fused), torch.isinf(ref)), name
        finite = torch.isfinite(ref)
        assert rel_err(fused[finite], ref[finite]) <= tol, name
    assert results[False][0][0, 0].abs().max() == 0 and torch.isinf(results[False][1][0, :, 0]).all()
