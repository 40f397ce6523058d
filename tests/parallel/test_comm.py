"""Counted collectives: exact byte/call accounting and timeouts instead of hangs."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from lctrain.parallel import comm
from lctrain.parallel.comm import P2POp
from lctrain.testing import DistributedError, run_distributed


def _collectives():
    n, r = dist.get_world_size(), dist.get_rank()
    x = torch.full((3, 4), float(r), dtype=torch.float64)  # 96 bytes
    with comm.record_comm() as rec, comm.comm_tag("t"):
        g = comm.all_gather(x, dim=1)
        assert g.shape == (3, 4 * n) and all((g[:, 4 * i:4 * i + 4] == i).all() for i in range(n))
        s = comm.reduce_scatter(torch.ones(2 * n, 5, dtype=torch.float32))  # 40n bytes
        assert torch.equal(s, torch.full((2, 5), float(n)))
        s1 = comm.reduce_scatter(torch.arange(n * 2, dtype=torch.float32).repeat(3, 1), dim=1)
        assert torch.equal(s1, n * torch.arange(2 * r, 2 * r + 2, dtype=torch.float32).repeat(3, 1))
        a = comm.all_reduce(torch.ones(7, dtype=torch.int64))  # 56 bytes
        assert torch.equal(a, torch.full((7,), n))
        t = comm.all_to_all(torch.arange(n * 2, dtype=torch.float32) + 100 * r, scatter_dim=0, gather_dim=0)
        assert torch.equal(t, torch.tensor([100 * i + 2 * r + j for i in range(n) for j in range(2)], dtype=torch.float32))
        if n > 1:
            recv = torch.empty(5, dtype=torch.float16)
            h = comm.batch_isend_irecv([P2POp("send", torch.full((5,), float(r), dtype=torch.float16), (r + 1) % n),
                                        P2POp("recv", recv, (r - 1) % n)])
            h.wait()
            assert torch.equal(recv, torch.full((5,), float((r - 1) % n), dtype=torch.float16))
    return rec.summary(), rec.calls(tag="t"), rec.events[0].group_size if rec.events else 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_recorder_counts_exact_bytes(world):
    for summary, calls, gsize in run_distributed(_collectives, world):
        if world == 1:  # single rank: collectives are identities and nothing goes on the wire
            assert summary == {} and calls == 0
            continue
        assert summary["all_gather"] == {"calls": 1, "bytes": 96}
        assert summary["reduce_scatter"] == {"calls": 2, "bytes": 40 * world + 4 * 3 * 2 * world}
        assert summary["all_reduce"] == {"calls": 1, "bytes": 56}
        assert summary["all_to_all"] == {"calls": 1, "bytes": 8 * world}
        assert summary["send"] == {"calls": 1, "bytes": 10}
        assert summary["recv"] == {"calls": 1, "bytes": 0}
        assert calls == 7 and gsize == world


def _mismatched():
    # The timeout is the process group's own (gloo enforces it); a 2 s group keeps the test short.
    short = dist.new_group(list(range(dist.get_world_size())), timeout=timedelta(seconds=2))
    if dist.get_rank() == 0:
        comm.all_gather(torch.ones(3), group=short)  # rank 1 never joins
    return "done"


def test_mismatched_collective_times_out_with_clear_error():
    with pytest.raises(DistributedError, match="(?s)rank 0/2 failed.*CollectiveTimeout.*all_gather on a group of 2 ranks"):
        run_distributed(_mismatched, 2, timeout_s=60)
    # The pool is rebuilt after such a failure: the next task works.
    assert run_distributed(_collectives, 2)[0][0]["all_gather"]["calls"] == 1


def _raises():
    raise KeyError(f"boom on {dist.get_rank()}")


def test_harness_surfaces_rank_tracebacks():
    with pytest.raises(DistributedError, match="(?s)rank 0/2 failed.*KeyError: 'boom on 0'.*rank 1/2 failed.*boom on 1"):
        run_distributed(_raises, 2)
