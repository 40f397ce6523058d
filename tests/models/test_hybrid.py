"""The hybrid model on a TP x CP x DP mesh equals the single-process model: loss, predictions, gradients.

Every rank builds the single-process reference itself (a tp=1, cp=1 mesh makes its collectives local),
runs it on the whole global batch, then builds the sharded model from the same seed, runs its slice of
the batch, reduces the loss with `global_token_mean` over DP x CP, averages the gradients over DP x CP
(what the trainer's DeepSpeed engine does) and gathers them to full shape over TP.

float64 parameters and activations; Megatron's vocab_parallel_cross_entropy computes in float32, so the
loss and the logits' gradient carry float32 rounding (measured up to 3e-8 relative): tolerance 5e-7 (scaled to the
tensor's magnitude by assert_close). A wrong SP exchange or TP split shows up as O(1e-2) or more.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from lctrain.models import ModelConfig, build_model, global_token_mean
from lctrain.models.tensor_parallel import gather_full_parameters
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_positions
from lctrain.testing import DistributedError, run_distributed
from lctrain.testing.compare import assert_close

TOL = dict(rtol=5e-7, atol=5e-7)
BATCH_PER_DP, SEQ = 2, 16

BASE = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                   layer_pattern="L", init_std=0.1)

#: (name, config overrides, cp layout) — each softmax SP method, each linear SP method, each valid layout.
VARIANTS = [
    ("L-lasp2-zigzag", dict(layer_pattern="L", linear_sp="lasp2"), "zigzag"),
    ("L-lasp2-contig", dict(layer_pattern="L", linear_sp="lasp2", feature_map="elu1", linear_output_gate="silu"),
     "contiguous"),
    ("L-lasp1-contig", dict(layer_pattern="L", linear_sp="lasp1", linear_decay="lightning_depth"), "contiguous"),
    ("A-allgather-zigzag", dict(layer_pattern="A", softmax_sp="allgather"), "zigzag"),
    ("A-allgather-contig", dict(layer_pattern="A", softmax_sp="allgather", tie_embeddings=True), "contiguous"),
    ("A-ring-zigzag", dict(layer_pattern="A", softmax_sp="ring"), "zigzag"),
    ("A-ring-contig", dict(layer_pattern="A", softmax_sp="ring"), "contiguous"),
    ("A-ulysses-zigzag", dict(layer_pattern="A", softmax_sp="ulysses"), "zigzag"),
    ("A-ulysses-contig", dict(layer_pattern="A", softmax_sp="ulysses"), "contiguous"),
    ("LLLA-allgather-lasp2-zigzag", dict(layer_pattern="LLLA", num_layers=4, softmax_sp="allgather"), "zigzag"),
    ("LLLA-ring-lasp2-zigzag", dict(layer_pattern="LLLA", num_layers=4, softmax_sp="ring", linear_decay="none",
                                    feature_map="silu"), "zigzag"),
    ("LWA-halo-lasp2-zigzag", dict(layer_pattern="LWA", num_layers=3, window_size=5), "zigzag"),
    ("W-halo-contig", dict(layer_pattern="W", window_size=3), "contiguous"),
    ("LW-ring-lasp2_tree-zigzag", dict(layer_pattern="LW", window_size=6, window_sp="ring", linear_sp="lasp2_tree"),
     "zigzag"),
    ("DW-allgather-lasp2_tree-contig", dict(layer_pattern="DW", window_size=4, window_sp="allgather",
                                            linear_sp="lasp2_tree"), "contiguous"),
    ("LLLA-ulysses-lasp1-contig", dict(layer_pattern="LLLA", num_layers=4, softmax_sp="ulysses", linear_sp="lasp1",
                                       linear_output_norm=False, linear_output_gate="none", feature_map="elu1"),
     "contiguous"),
]


def _batch(seed: int, batch: int, cfg: ModelConfig):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, SEQ + 1), generator=g)
    mask = (torch.rand(batch, SEQ, generator=g) > 0.3).to(torch.float64)
    return ids[:, :-1], ids[:, 1:], mask


def _reference(cfg: ModelConfig, seed: int, batch: int):
    """Single-process loss, predictions and full gradients on the whole global batch (under a tp=1, cp=1 mesh)."""
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    ids, labels, mask = _batch(seed + 1, batch, cfg)
    out = model(ids, torch.arange(SEQ), labels, mask, return_predictions=True)
    loss = out.loss_sum / out.num_tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), out.predictions, weights, grads


def _sharded(cfg: ModelConfig, seed: int, mesh, layout: str):
    """The same model on `mesh`: loss, this rank's predictions and token indices, full weights and grads."""
    torch.manual_seed(seed)
    model = build_model(cfg, mesh, layout).double()
    ids, labels, mask = _batch(seed + 1, BATCH_PER_DP * mesh.dp, cfg)
    rows = slice(mesh.dp_rank * BATCH_PER_DP, (mesh.dp_rank + 1) * BATCH_PER_DP)
    pos = shard_positions(SEQ, mesh.cp_rank, mesh.cp, layout)
    out = model(ids[rows][:, pos], pos, labels[rows][:, pos], mask[rows][:, pos], return_predictions=True)
    loss = global_token_mean(out.loss_sum, out.num_tokens, mesh.dp_cp_group)
    loss.backward()
    # The trainer's engine averages gradients over DP x CP.
    w = comm.group_size(mesh.dp_cp_group)
    for p in model.parameters():
        comm.all_reduce(p.grad, group=mesh.dp_cp_group).div_(w)
    weights = gather_full_parameters(model, mesh.tp_group)
    grads = gather_full_parameters(model, mesh.tp_group, grads=True)
    return loss.detach(), out.predictions, (rows, pos), weights, grads


def _applies(cfg: ModelConfig, cp: int, layout: str) -> bool:
    if cp == 1:
        return layout == "zigzag"  # one CP rank: the layout changes nothing, check each config once
    return not (cfg.linear_sp == "lasp1" and "L" in cfg.mixers and layout != "contiguous")


def _check_variants(seed: int, meshes: list[tuple[int, int]], variants: list) -> int:
    """Every variant on every mesh against its single-process reference; returns how many were compared."""
    world = comm.group_size(None)
    cfgs = [(name, dataclasses.replace(BASE, **overrides), layout) for name, overrides, layout in variants]
    init_mesh(MeshConfig(tp=1, cp=1))
    refs = {(name, world // (tp * cp)): None for name, _, _ in cfgs for tp, cp in meshes}
    for name, cfg, _ in cfgs:
        for key in [k for k in refs if k[0] == name]:
            refs[key] = _reference(cfg, seed, BATCH_PER_DP * key[1])
    checked = 0
    for tp, cp in meshes:
        mesh = init_mesh(MeshConfig(tp=tp, cp=cp))  # the layout is the model's and the data's, not the mesh's
        for layout in ("zigzag", "contiguous"):
            for name, cfg, cfg_layout in cfgs:
                if cfg_layout != layout or not _applies(cfg, cp, layout):
                    continue
                ref_loss, ref_pred, ref_w, ref_g = refs[(name, mesh.dp)]
                loss, pred, (rows, pos), w, g = _sharded(cfg, seed, mesh, layout)
                where = f"{name} tp={tp} cp={cp} dp={mesh.dp}"
                assert_close(loss, ref_loss, f"{where} loss", **TOL)
                assert torch.equal(pred, ref_pred[rows][:, pos]), f"{where} predictions"
                assert set(g) == set(ref_g), where
                for n in ref_g:
                    assert_close(w[n], ref_w[n], f"{where} weight {n}", rtol=0, atol=0)
                    assert_close(g[n], ref_g[n], f"{where} grad {n}", **TOL)
                checked += 1
    return checked


# (1, 1) on two ranks is pure DP; on four ranks (2, 1) and (1, 2) also carry DP = 2.
@pytest.mark.parametrize("world,meshes", [(2, [(1, 1), (2, 1), (1, 2)]), (4, [(1, 4), (2, 2), (2, 1), (1, 2)])])
def test_sharded_model_matches_single_process(world, meshes):
    seed = random.randrange(2**31)
    counts = run_distributed(_check_variants, world, seed, meshes, VARIANTS)
    assert counts[0] > 0 and len(set(counts)) == 1, counts


def _build(cfg_kw: dict, tp: int, cp: int, layout: str):
    init_mesh(MeshConfig(tp=tp, cp=cp, cp_layout=layout))
    build_model(dataclasses.replace(BASE, **cfg_kw), cp_layout=layout)


@pytest.mark.parametrize("cfg_kw,tp,cp,layout,match", [
    (dict(num_heads=2, num_kv_heads=2), 4, 1, "zigzag", "num_heads 2 is not divisible by the TP size 4"),
    (dict(num_kv_heads=1), 2, 1, "zigzag", "num_kv_heads 1 is not divisible by the TP size 2"),
    (dict(layer_pattern="A", softmax_sp="ulysses", num_heads=2, num_kv_heads=2), 1, 4, "zigzag",
     "ulysses needs the heads per TP rank"),
    (dict(linear_sp="lasp1"), 1, 2, "zigzag", "lasp1.*contiguous"),
])
def test_bad_layout_raises_on_every_rank(cfg_kw, tp, cp, layout, match):
    with pytest.raises(DistributedError, match=match) as info:
        run_distributed(_build, 4, cfg_kw, tp, cp, layout)
    assert sorted(info.value.failures) == [0, 1, 2, 3]


def _odd_local_sequence():
    mesh = init_mesh(MeshConfig(tp=1, cp=2))
    torch.manual_seed(0)
    model = build_model(BASE, mesh, "zigzag")
    ids = torch.zeros(1, 3, dtype=torch.long)
    model(ids, torch.arange(3), ids)


def test_odd_sequence_raises_before_any_collective():
    with pytest.raises(DistributedError, match="not divisible by 2\\*CP = 4") as info:
        run_distributed(_odd_local_sequence, 2)
    assert sorted(info.value.failures) == [0, 1]


def _train_steps(steps: int, seed: int) -> list[float]:
    """A few Adam steps of the tiny hybrid model on one fixed batch, on a CP=2 mesh (gradients averaged
    over DP x CP as the trainer's engine does)."""
    mesh = init_mesh(MeshConfig(tp=1, cp=2))
    cfg = dataclasses.replace(BASE, layer_pattern="LA", num_layers=2)
    torch.manual_seed(seed)
    model = build_model(cfg, mesh, "zigzag")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, labels, mask = _batch(seed, 4, cfg)
    pos = shard_positions(SEQ, mesh.cp_rank, mesh.cp, "zigzag")
    losses = []
    for _ in range(steps):
        out = model(ids[:, pos], pos, labels[:, pos], mask[:, pos].float())
        loss = global_token_mean(out.loss_sum, out.num_tokens, mesh.dp_cp_group)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            comm.all_reduce(p.grad, group=mesh.dp_cp_group).div_(comm.group_size(mesh.dp_cp_group))
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_loss_falls():
    losses = run_distributed(_train_steps, 2, 10, random.randrange(2**31))
    assert losses[0] == losses[1]  # every CP rank reports the same global loss
    curve = losses[0]
    assert all(b < a for a, b in zip(curve, curve[1:])), curve  # measured: 4.4 -> 0.6 in 10 steps
    assert curve[-1] < 0.4 * curve[0], curve


def _stale_mesh():
    old = init_mesh(MeshConfig(tp=2, cp=1))
    init_mesh(MeshConfig(tp=1, cp=2))
    build_model(BASE, old)


def test_stale_mesh_raises():
    with pytest.raises(DistributedError, match="not the current one"):
        run_distributed(_stale_mesh, 2)
