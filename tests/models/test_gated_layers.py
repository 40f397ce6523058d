"""The gated mixers (GatedDeltaNet "D", GLA "G") in the hybrid model: the TP x CP x DP model equals the
single-process model (loss, predictions, every gradient), and the short convolution's halo crosses CP
boundaries exactly, with one counted P2P exchange each way."""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lctrain.models import ModelConfig
from lctrain.models.short_conv import causal_conv_cp
from lctrain.parallel import MeshConfig, comm, init_mesh, shard_sequence
from lctrain.testing import run_distributed
from lctrain.testing.compare import assert_close
from tests.models.test_hybrid import _check_variants

#: (name, config overrides, cp layout); SEQ = 16 in test_hybrid, so CP=4 zigzag chunks hold 2 tokens: kernel 3.
VARIANTS = [
    ("D-zigzag", dict(layer_pattern="D", short_conv_size=3), "zigzag"),
    ("G-contig", dict(layer_pattern="G", short_conv_size=2), "contiguous"),
    ("DDDA-zigzag", dict(layer_pattern="DDDA", num_layers=4, short_conv_size=3), "zigzag"),
    ("GDLA-contig", dict(layer_pattern="GDLA", num_layers=4, short_conv_size=3, softmax_sp="ring"), "contiguous"),
    ("GD-lasp1-contig", dict(layer_pattern="GD", num_layers=2, short_conv_size=3, linear_sp="lasp1"), "contiguous"),
    ("DA-selective-zigzag", dict(layer_pattern="DA", num_layers=2, short_conv_size=3,
                                 activation_checkpointing="selective"), "zigzag"),
]


@pytest.mark.parametrize("world,meshes", [(2, [(2, 1), (1, 2)]),
                                         pytest.param(4, [(1, 4), (2, 2)], marks=pytest.mark.slow)])
def test_gated_model_matches_single_process(world, meshes):
    seed = random.randrange(2**31)
    counts = run_distributed(_check_variants, world, seed, meshes, VARIANTS)
    assert counts[0] > 0 and len(set(counts)) == 1, counts


def _conv_case(seed: int, layout: str, kernel: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_mesh(MeshConfig(cp=world))
    gen = torch.Generator().manual_seed(seed)
    b, ch, s = 2, 5, 6 * world
    x = torch.randn(b, s, ch, generator=gen, dtype=torch.float64)
    w = torch.randn(ch, kernel, generator=gen, dtype=torch.float64)
    dy = torch.randn(b, s, ch, generator=gen, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = F.conv1d(F.pad(xr.transpose(1, 2), (kernel - 1, 0)), wr[:, None], groups=ch).transpose(1, 2)
    ref_dx, ref_dw = torch.autograd.grad((ref * dy).sum(), [xr, wr])
    xl = shard_sequence(x, dim=1, layout=layout).requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    with comm.record_comm() as rec:
        y = causal_conv_cp(xl, wl, mesh.cp_group, layout, mesh.cp_rank, mesh.cp)
        (y * shard_sequence(dy, dim=1, layout=layout)).sum().backward()
    where = f"rank {rank}/{world} {layout} K={kernel}"
    assert_close(y, shard_sequence(ref, dim=1, layout=layout).detach(), f"y {where}")
    assert_close(xl.grad, shard_sequence(ref_dx, dim=1, layout=layout), f"dx {where}")
    assert_close(comm.all_reduce(wl.grad.clone()), ref_dw, f"dw {where}")  # each rank: its tokens' share
    return rec.summary(), rec.bytes("send", "conv_halo.fwd"), rec.bytes("send", "conv_halo.bwd")


@pytest.mark.parametrize("world", [2, 3])
def test_conv_halo_crosses_cp_boundaries(world):
    seed = random.randrange(2**31)
    for layout in ("contiguous", "zigzag"):
        for kernel in (1, 3, 4):
            results = run_distributed(_conv_case, world, seed, layout, kernel)
            for rank, (summary, fwd, bwd) in enumerate(results):
                if kernel == 1:
                    assert summary == {}, summary
                    continue
                # Forward: contiguous sends one tail to r+1 (none from the last rank); zigzag a tail to each
                # neighbour (rank 0 has no left one, rank P-1's late chunk follows its own early chunk).
                # Backward: each received halo's gradient goes back to its owner.
                halo = 2 * (kernel - 1) * 5 * 8  # [b, K-1, ch] float64
                if layout == "contiguous":
                    sends, recvs = rank < world - 1, rank > 0
                else:
                    sends = recvs = (rank > 0) + (rank < world - 1)
                assert (fwd, bwd) == (sends * halo, recvs * halo), (layout, kernel, rank, summary)
                assert set(summary) <= {"send", "recv"}, summary


def _short_chunks():
    mesh = init_mesh(MeshConfig(cp=2))
    causal_conv_cp(torch.zeros(1, 2, 3), torch.zeros(3, 4), mesh.cp_group, "zigzag", mesh.cp_rank, mesh.cp)


def test_chunks_shorter_than_the_halo_fail_clearly():
    from lctrain.testing import DistributedError

    with pytest.raises(DistributedError, match="needs chunks of at least 3 tokens"):
        run_distributed(_short_chunks, 2)


def test_config_accepts_gated_mixers():
    assert ModelConfig(layer_pattern="DDDA").mixers == "DDDA"
    with pytest.raises(ValueError, match="D \\(GatedDeltaNet\\)"):
        ModelConfig(layer_pattern="DX")
    with pytest.raises(ValueError, match="short_conv_size"):
        ModelConfig(short_conv_size=0)


def test_gated_model_runs_under_fake_tensors_and_the_fake_backend(fake_group):
    """The planner simulates the real model on FakeTensors with a fake process group: the gated mixers (their
    halo P2P and LASP-2 all-gathers included) must run there."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lctrain.models import build_model
    from lctrain.parallel import destroy_mesh, shard_positions

    try:
        mesh = init_mesh(MeshConfig(tp=1, cp=4))
        cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=48, layer_pattern="DGDA")
        with FakeTensorMode(allow_non_fake_inputs=True), comm.record_comm() as rec:
            model = build_model(cfg, mesh, "zigzag")
            pos = shard_positions(64, 1, 4, "zigzag")
            ids = torch.randint(0, 64, (2, 16))
            out = model(ids, pos, ids)
            out.loss_sum.backward()
        assert isinstance(out.loss_sum, FakeTensor)
        assert rec.calls("send", "conv_halo") > 0 and rec.calls("all_gather", "lasp2") > 0, rec.summary()
    finally:
        destroy_mesh()
