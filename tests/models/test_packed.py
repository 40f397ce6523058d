"""Packed documents: the model on a packed batch equals the same documents run one by one.

The reference runs every document of the global batch on its own (single process, a tp=1, cp=1 mesh),
positions 0 ... n-1, its last token unscored, and takes the token mean over all documents. The packed model
gets the sequences with `cu_seqlens` (documents of random lengths, 1 included, a padding document at the
end of some sequences, labels = the next token of the STREAM, so the model itself must stop predicting
across a boundary), on TP x CP x DP meshes as in test_hybrid.py; loss and gradients must agree. float64
model, Megatron's cross-entropy in float32: tolerance 5e-7 as in test_hybrid.py.

Restarting RoPE per document does not change attention within a document in exact arithmetic (RoPE is
relative), so the position tables are tested directly (test_document_tables_restart_positions).

Every mixer takes packed batches natively on any CP size now (softmax, linear "L", GatedDeltaNet "D", GLA "G":
state resets and convolution taps masked at document starts), so on world 2 every variant is compared; a mixer
without `cu_seqlens=` support would raise NotImplementedError on every rank (before any collective).
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from lctrain import sp
from lctrain.models import ModelConfig, build_model, global_token_mean
from lctrain.models.packing import check_cu_seqlens, document_tables
from lctrain.models.rope import apply_rope, rope_cos_sin
from lctrain.models.tensor_parallel import gather_full_parameters
from lctrain.ops.attention_ref import reference_attention_forward
from lctrain.ops.linear_attention_ref import linear_attention_ref
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_positions, shard_sequence, unshard_sequence
from lctrain.testing import run_distributed
from lctrain.testing.compare import assert_close

TOL = dict(rtol=5e-7, atol=5e-7)
SEQ, BATCH_PER_DP, PAD_ID = 16, 2, 0
BASE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                   layer_pattern="A", init_std=0.1)
VARIANTS = [
    ("A-allgather-zigzag", dict(layer_pattern="A", softmax_sp="allgather"), "zigzag"),
    ("A-ring-contig", dict(layer_pattern="A", softmax_sp="ring"), "contiguous"),
    ("A-ulysses-zigzag", dict(layer_pattern="A", softmax_sp="ulysses"), "zigzag"),
    ("LA-lasp2-ring-zigzag", dict(layer_pattern="LA", softmax_sp="ring", linear_sp="lasp2"), "zigzag"),
    ("LA-lasp1-ulysses-contig", dict(layer_pattern="LA", softmax_sp="ulysses", linear_sp="lasp1",
                                     feature_map="elu1"), "contiguous"),
    ("DA-lasp2-allgather-zigzag", dict(layer_pattern="DA", softmax_sp="allgather", linear_sp="lasp2",
                                       short_conv_size=3), "zigzag"),
    ("GL-lasp1-contig", dict(layer_pattern="GL", linear_sp="lasp1", short_conv_size=3), "contiguous"),
]


def _packed_batch(seed: int, rows: int, vocab: int):
    """`rows` sequences of SEQ tokens packed with random documents; returns ids, stream labels, cu_seqlens,
    the documents (token lists, padding excluded) and a per-token pad flag."""
    g = random.Random(seed)
    ids, bounds, docs, pad = [], [0], [], []
    for _ in range(rows):
        fill = 0
        while fill < SEQ:
            n = min(g.choice([1, 1, 2, 3, 5, 7, 9, SEQ]), SEQ - fill)
            if fill > 0 and g.random() < 0.2:  # a padding document closes this sequence
                n = SEQ - fill
                ids += [PAD_ID] * n
                pad += [True] * n
            else:
                doc = [g.randrange(1, vocab) for _ in range(n)]
                ids += doc
                docs.append(doc)
                pad += [False] * n
            fill += n
            bounds.append(bounds[-1] + n)
    ids_t = torch.tensor(ids).view(rows, SEQ)
    labels = torch.tensor(ids[1:] + [0]).view(rows, SEQ)  # the stream's next token: crosses documents
    labels[torch.tensor(pad).view(rows, SEQ)] = -100  # padding is never scored
    return ids_t, labels, torch.tensor(bounds, dtype=torch.int32), docs


def _reference(cfg: ModelConfig, seed: int, rows: int):
    torch.manual_seed(seed)
    model = build_model(cfg, cp_layout="contiguous").double()  # one rank: any length (zigzag wants even ones)
    _, _, _, docs = _packed_batch(seed + 1, rows, cfg.vocab_size)
    loss_sum, count = 0.0, 0.0
    for doc in docs:
        ids = torch.tensor(doc)[None]
        labels = torch.tensor(doc[1:] + [-100])[None]  # the document's last token predicts nothing
        out = model(ids, torch.arange(len(doc)), labels)
        loss_sum, count = loss_sum + out.loss_sum, count + out.num_tokens
    loss = loss_sum / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(cfg: ModelConfig, seed: int, mesh, layout: str):
    torch.manual_seed(seed)
    model = build_model(cfg, mesh, layout).double()
    ids, labels, cu, _ = _packed_batch(seed + 1, BATCH_PER_DP * mesh.dp, cfg.vocab_size)
    rows = slice(mesh.dp_rank * BATCH_PER_DP, (mesh.dp_rank + 1) * BATCH_PER_DP)
    # This DP rank's sequences and their boundaries (renumbered from 0).
    first, last = mesh.dp_rank * BATCH_PER_DP * SEQ, (mesh.dp_rank + 1) * BATCH_PER_DP * SEQ
    mine = cu[(cu >= first) & (cu <= last)] - first
    pos = shard_positions(SEQ, mesh.cp_rank, mesh.cp, layout)
    if model.packed_problem is not None:
        with pytest.raises(NotImplementedError, match="cu_seqlens"):
            model(ids[rows][:, pos], pos, labels[rows][:, pos], cu_seqlens=mine)
        return None
    out = model(ids[rows][:, pos], pos, labels[rows][:, pos], cu_seqlens=mine)
    loss = global_token_mean(out.loss_sum, out.num_tokens, mesh.dp_cp_group)
    loss.backward()
    w = comm.group_size(mesh.dp_cp_group)
    for p in model.parameters():
        comm.all_reduce(p.grad, group=mesh.dp_cp_group).div_(w)
    return loss.detach(), gather_full_parameters(model, mesh.tp_group, grads=True)


def _check(seed: int, meshes: list[tuple[int, int]]) -> tuple[int, int]:
    world = comm.group_size(None)
    init_mesh(MeshConfig(tp=1, cp=1))
    cfgs = [(name, dataclasses.replace(BASE, **kw), layout) for name, kw, layout in VARIANTS]
    refs = {(name, world // (tp * cp)): None for name, _, _ in cfgs for tp, cp in meshes}
    for name, cfg, _ in cfgs:
        for key in [k for k in refs if k[0] == name]:
            refs[key] = _reference(cfg, seed, BATCH_PER_DP * key[1])
    compared = refused = 0
    for tp, cp in meshes:
        mesh = init_mesh(MeshConfig(tp=tp, cp=cp))
        for name, cfg, layout in cfgs:
            got = _packed(cfg, seed, mesh, layout)
            if got is None:
                refused += 1
                continue
            ref_loss, ref_g = refs[(name, mesh.dp)]
            where = f"{name} tp={tp} cp={cp} dp={mesh.dp}"
            assert_close(got[0], ref_loss, f"{where} loss", **TOL)
            for n in ref_g:
                assert_close(got[1][n], ref_g[n], f"{where} grad {n}", **TOL)
            compared += 1
    return compared, refused


class _GatherSummed(torch.autograd.Function):
    """The whole sequence from every rank's slice; backward sums all ranks' gradients and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        return unshard_sequence(x.detach(), group, 1, layout)

    @staticmethod
    def backward(ctx, g):
        g = comm.all_reduce(g.contiguous(), group=ctx.group)
        return shard_sequence(g, ctx.group, 1, ctx.layout), None, None


def _varlen_by_gathering(local_fn):
    """A stand-in varlen SP method (takes cu_seqlens=, as DESIGN.md specifies): gather the whole batch, run
    `local_fn` on each document of the b sequences laid end to end, keep this rank's slice. Slow and exact."""
    def fn(q, k, v, group=None, causal=True, layout="zigzag", cu_seqlens=None, **kw):
        full = [_GatherSummed.apply(t, group, layout) for t in (q, k, v)]  # [b, s, h, d]
        b, s = full[0].shape[:2]
        flat = [t.reshape(1, b * s, *t.shape[2:]) for t in full]
        bounds = cu_seqlens.tolist() if cu_seqlens is not None else list(range(0, b * s + 1, s))
        o = torch.cat([local_fn(*(t[:, a:e] for t in flat), **kw) for a, e in zip(bounds[:-1], bounds[1:])], dim=1)
        return shard_sequence(o.reshape(b, s, *o.shape[2:]), group, 1, layout)
    return fn


def _check_native(seed: int) -> int:
    """CP = 2, both layouts, with stand-in varlen SP methods: what the model itself does on CP ranks (positions
    from the sharding helper, document ends across ranks, cu_seqlens over b sequences) against the reference."""
    saved = sp.allgather_attention, sp.lasp2_linear_attention
    sp.allgather_attention = _varlen_by_gathering(
        lambda q, k, v, softmax_scale: reference_attention_forward(q, k, v, True, softmax_scale)[0])
    sp.lasp2_linear_attention = _varlen_by_gathering(
        lambda q, k, v, log_decay: linear_attention_ref(q, k, v, log_decay)[0])
    try:
        init_mesh(MeshConfig(tp=1, cp=1))
        cfgs = [dataclasses.replace(BASE, layer_pattern=p, softmax_sp="allgather", linear_sp="lasp2")
                for p in ("A", "LA")]
        refs = [_reference(cfg, seed, BATCH_PER_DP) for cfg in cfgs]
        mesh = init_mesh(MeshConfig(tp=1, cp=2))
        checked = 0
        for layout in ("zigzag", "contiguous"):
            for cfg, (ref_loss, ref_g) in zip(cfgs, refs):
                loss, grads = _packed(cfg, seed, mesh, layout)
                assert_close(loss, ref_loss, f"{cfg.layer_pattern} {layout} loss", **TOL)
                for n in ref_g:
                    assert_close(grads[n], ref_g[n], f"{cfg.layer_pattern} {layout} grad {n}", **TOL)
                checked += 1
        return checked
    finally:
        sp.allgather_attention, sp.lasp2_linear_attention = saved


def test_native_varlen_path_on_cp2_with_stand_in_sp_methods():
    assert run_distributed(_check_native, 2, random.randrange(2**31)) == [4, 4]


@pytest.mark.parametrize("world,meshes", [(2, [(1, 1), (2, 1), (1, 2)]),
                                          pytest.param(4, [(2, 2), (1, 4)], marks=pytest.mark.slow)])
def test_packed_model_matches_documents_one_by_one(world, meshes):
    results = run_distributed(_check, world, random.randrange(2**31), meshes)
    assert len(set(results)) == 1, results
    compared, refused = results[0]
    assert compared + refused == len(meshes) * len(VARIANTS), results
    if world == 2:
        assert compared == len(meshes) * len(VARIANTS), results  # every method takes cu_seqlens on CP = 2 too


def test_document_tables_restart_positions():
    """Positions restart per document and follow the CP layout's global positions (zigzag, cp=2, rank 1)."""
    cu = torch.tensor([0, 3, 8, 9, 16, 21, 32], dtype=torch.int32)  # two sequences of 16
    pos = shard_positions(16, 1, 2, "zigzag")  # tokens 4-7 and 8-11
    positions, last = document_tables(cu, pos, 2, 16)
    assert positions.tolist() == [[1, 2, 3, 4, 0, 0, 1, 2], [4, 0, 1, 2, 3, 4, 5, 6]]
    assert last.tolist() == [[False, False, False, True, True, False, False, False],
                             [True, False, False, False, False, False, False, False]]


def test_rope_batched_tables_match_per_row():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    p = torch.tensor([[0, 1, 2, 0, 1], [4, 0, 1, 2, 3]])
    cos, sin = rope_cos_sin(p, 8, 10000.0, torch.float64)
    out = apply_rope(x, cos, sin)
    for r in range(2):
        c, s = rope_cos_sin(p[r], 8, 10000.0, torch.float64)
        assert torch.equal(out[r:r + 1], apply_rope(x[r:r + 1], c, s))


@pytest.mark.parametrize("cu,match", [
    ([0, 5, 20, 32], "every sequence end"),
    ([0, 16, 16, 32], "strictly increasing"),
    ([0, 16, 30], "from 0 to batch"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(torch.tensor(cu, dtype=torch.int32), 2, 16)


def _syncs_per_forward(num_layers: int) -> int:
    from lctrain.testing.hot_path import count_host_syncs

    init_mesh(MeshConfig(tp=1, cp=1))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(BASE, layer_pattern="LA", num_layers=num_layers))
    ids, labels, cu, _ = _packed_batch(3, 2, BASE.vocab_size)
    pos = torch.arange(SEQ)
    model(ids, pos, labels, cu_seqlens=cu)  # first call: per-signature checks
    with count_host_syncs() as syncs:
        model(ids, pos, labels, cu_seqlens=cu)
    return syncs.count


def test_document_tables_are_built_once_per_batch_not_per_layer():
    """The host reads of cu_seqlens happen once per forward: 2 and 6 layers sync the same number of times."""
    results = run_distributed(_syncs_per_forward, 1, 2), run_distributed(_syncs_per_forward, 1, 6)
    assert results[0] == results[1], results
