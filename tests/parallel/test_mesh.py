"""The DP x CP x TP mesh built through Megatron-core's parallel_state."""
import pytest
import torch.distributed as dist

from lctrain.parallel import MeshConfig, init_mesh
from lctrain.testing import DistributedError, run_distributed


def _groups(tp: int, cp: int):
    mesh = init_mesh(MeshConfig(tp=tp, cp=cp))
    ranks = dist.get_process_group_ranks
    return dict(rank=mesh.rank, dp=mesh.dp, tp=ranks(mesh.tp_group), cp=ranks(mesh.cp_group),
                dp_=ranks(mesh.dp_group), dpcp=ranks(mesh.dp_cp_group),
                coords=(mesh.tp_rank, mesh.cp_rank, mesh.dp_rank))


def _expected(rank: int, world: int, tp: int, cp: int):
    """Megatron's "tp-cp-ep-dp-pp" order: rank = tp_rank + tp * (cp_rank + cp * dp_rank)."""
    t, c, d = rank % tp, (rank // tp) % cp, rank // (tp * cp)
    dp = world // (tp * cp)
    at = lambda t_, c_, d_: t_ + tp * (c_ + cp * d_)  # noqa: E731
    return dict(rank=rank, dp=dp, tp=[at(i, c, d) for i in range(tp)], cp=[at(t, i, d) for i in range(cp)],
                dp_=[at(t, c, i) for i in range(dp)],
                dpcp=sorted(at(t, i, j) for i in range(cp) for j in range(dp)), coords=(t, c, d))


@pytest.mark.parametrize("world,tp,cp", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 1, 2), (4, 1, 4), (3, 1, 3), (4, 4, 1)])
def test_mesh_groups(world, tp, cp):
    got = run_distributed(_groups, world, tp, cp)
    for r in range(world):
        assert got[r] == _expected(r, world, tp, cp)


@pytest.mark.parametrize("tp,cp,match", [(2, 2, "not divisible by tp\\*cp"), (0, 1, "parallel.tp must be"),
                                          (1, -1, "parallel.cp must be")])
def test_mesh_bad_layout_raises_on_every_rank(tp, cp, match):
    with pytest.raises(DistributedError, match=match) as info:
        run_distributed(_groups, 3, tp, cp)
    assert sorted(info.value.failures) == [0, 1, 2]


def test_mesh_config_validate_without_processes():
    assert MeshConfig(tp=2, cp=2).validate(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*cp = 4\\*1"):
        MeshConfig(tp=4).validate(6)
    with pytest.raises(ValueError, match="cp_layout"):
        MeshConfig(cp_layout="striped").validate(1)


@pytest.mark.parametrize("backend,cuda,expected", [(None, True, "cpu:gloo,cuda:nccl"), ("nccl", True, "cpu:gloo,cuda:nccl"),
                                                   (None, False, "gloo"), ("gloo", True, "gloo")])
def test_default_group_carries_a_cpu_backend_beside_nccl(monkeypatch, backend, cuda, expected):
    """On a GPU the default group is NCCL for CUDA tensors plus gloo for CPU ones (object collectives, DCP planning)."""
    import torch

    from lctrain.parallel import mesh

    seen = {}
    monkeypatch.setattr(mesh.comm, "is_distributed", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("device", i))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.setdefault("backend", backend))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    mesh.init_distributed(backend)
    assert seen["backend"] == expected
    assert ("device" in seen) == (expected != "gloo")


def test_single_process_world_leaves_the_environment_alone(monkeypatch):
    """Without a launcher, a world of 1 on a local port; RANK/WORLD_SIZE are not set, so a later `--nproc 4` in the
    same process (a test, a notebook) is not taken for a rank of a launched job of world 1."""
    import os

    from lctrain.parallel import mesh

    seen = {}
    monkeypatch.setattr(mesh.comm, "is_distributed", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    mesh.init_distributed("gloo")
    assert (seen["rank"], seen["world_size"], seen["backend"]) == (0, 1, "gloo")
    assert seen["init_method"].startswith("tcp://127.0.0.1:")
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
