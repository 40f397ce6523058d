"""LASP-1 equals naive linear attention on the unsharded sequence; its state travels by P-1 serial sends."""
import pytest
import torch
import torch.distributed as dist

from lctrain.parallel import MeshConfig, init_mesh
from lctrain.sp import lasp1_linear_attention
from lctrain.testing import run_distributed
from tests.sp.test_lasp2 import check_against_reference

#: (decay, causal, layout, dtype); LASP-1 is contiguous only.
CONFIGS = [(decay, True, "contiguous", torch.float64) for decay in (None, "fixed", "learned")]
CONFIGS += [(None, False, "contiguous", torch.float64), ("learned", True, "contiguous", torch.float32),
            ("fixed", True, "contiguous", torch.bfloat16)]


def _lasp1_all_configs(seed):
    world, rank = dist.get_world_size(), dist.get_rank()
    init_mesh(MeshConfig(cp=world))
    sends = {}
    for i, cfg in enumerate(CONFIGS):
        rec = check_against_reference(lasp1_linear_attention, cfg, seed + i, layout_kw=False)
        assert rec.calls("all_gather") == 0, rec.summary()
        sends[cfg] = (rec.calls("send", "lasp1.fwd"), rec.calls("send", "lasp1.bwd"),
                      rec.calls("recv", "lasp1.fwd"), rec.calls("recv", "lasp1.bwd"),
                      rec.bytes("send", "lasp1.fwd"))
    return rank, sends


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp1_matches_reference_with_serial_sends(world):
    seed = int(torch.randint(0, 2**31, ()).item())
    totals = {}
    for rank, sends in run_distributed(_lasp1_all_configs, world, seed):
        for key, (fwd, bwd, rfwd, rbwd, fwd_bytes) in sends.items():
            decay, causal, _, dtype = key
            if world == 1:
                assert (fwd, bwd, rfwd, rbwd) == (0, 0, 0, 0)
            elif causal:
                # The chain: rank r receives from r-1 and sends to r+1 forward, the reverse backward.
                assert (fwd, rfwd) == (int(rank < world - 1), int(rank > 0)), (rank, key)
                assert (bwd, rbwd) == (int(rank > 0), int(rank < world - 1)), (rank, key)
            else:
                assert fwd == bwd == rfwd == rbwd == world - 1, (rank, key)
            if causal:
                # One [b, h, dk, dv] state per send, float32 whatever the input dtype (float64 for float64).
                assert fwd_bytes == fwd * 2 * 2 * 3 * 4 * (8 if dtype == torch.float64 else 4), (rank, key)
            tot = totals.setdefault(key, [0, 0])
            tot[0], tot[1] = tot[0] + fwd, tot[1] + bwd
    for (decay, causal, _, _), (fwd, bwd) in totals.items():
        expected = world - 1 if causal else world * (world - 1)
        assert fwd == bwd == expected, (decay, causal, fwd, bwd)
