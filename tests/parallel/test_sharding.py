"""shard_sequence / unshard_sequence: zigzag and contiguous layouts."""
import pytest
import torch

from lctrain.parallel import init_mesh, MeshConfig, position_ids, shard_positions, shard_sequence, unshard_sequence
from lctrain.testing import run_distributed


def test_zigzag_matches_hand_written_expectation():
    x = torch.arange(16).view(1, 16)
    # CP=2 -> 4 chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert shard_positions(16, 0, 2, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(16, 1, 2, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # CP=3 -> 6 chunks of 2.
    assert shard_positions(12, 0, 3, "zigzag").tolist() == [0, 1, 10, 11]
    assert shard_positions(12, 1, 3, "zigzag").tolist() == [2, 3, 8, 9]
    assert shard_positions(12, 2, 3, "zigzag").tolist() == [4, 5, 6, 7]
    assert shard_positions(12, 2, 3, "contiguous").tolist() == [8, 9, 10, 11]
    assert x[:, shard_positions(16, 1, 2, "zigzag")].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("seq,cp,layout,match", [(10, 3, "zigzag", "not divisible by 6"),
                                                  (10, 3, "contiguous", "not divisible by 3"),
                                                  (12, 2, "striped", "unknown CP layout")])
def test_bad_lengths_are_clear_errors(seq, cp, layout, match):
    with pytest.raises(ValueError, match=match):
        shard_positions(seq, 0, cp, layout)


def _round_trip(layout: str, seed: int):
    mesh = init_mesh(MeshConfig(cp=torch.distributed.get_world_size()))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 3, 4, generator=g, dtype=torch.float64)  # the same on every rank
    local = shard_sequence(x, dim=1, layout=layout)
    pos = position_ids(24, layout=layout)
    assert torch.equal(local, x[:, pos])
    full = unshard_sequence(local, dim=1, layout=layout)
    # The gradient of unshard is this rank's slice of the gradient of the full tensor.
    local.requires_grad_(True)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (unshard_sequence(local, dim=1, layout=layout) * w).sum().backward()
    return mesh.cp_rank, torch.equal(full, x), torch.equal(local.grad, w[:, pos])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_unshard_round_trip(world, layout):
    seed = int(torch.randint(0, 2**31, ()).item())
    for rank, same, grad_ok in run_distributed(_round_trip, world, layout, seed):
        assert same and grad_ok, f"rank {rank}"
