"""Shared fixtures: spawned gloo ranks are pooled for the session and stopped at its end; a fake process group."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def fake_group():
    """torch's "fake" process group of 4 ranks in this process (rank 1): how the planner simulates a job."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    yield
    from lctrain.testing import shutdown_pools

    shutdown_pools()
