"""Shared fixtures: spawned gloo ranks are pooled for the session and stopped at its end."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools():
    yield
    from lctrain.testing import shutdown_pools

    shutdown_pools()
