"""The fake world: a process group that, like NCCL, has a backend for one device only -- `meta` -- at the job's
world size, lctrain's real mesh on it, and the dispatch seam that makes meta tensors answer as GPU tensors.

    with fake_world(world_size=64, rank=7, parallel=cfg.parallel) as mesh:
        ...   # collectives on meta tensors return at once; on a CPU tensor they raise NCCL's error

`dist.init_process_group("meta:fake", store=FakeStore(), ...)` (torch's fake backend, registered for `meta` only):
one process plays rank `rank`; nothing moves. `init_mesh` builds Megatron's groups exactly as a run does.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist

from lctrain.ops.registry import meta_as_gpu
from lctrain.parallel.mesh import Mesh, MeshConfig, destroy_mesh, init_mesh

#: The backend string of the fake world: torch's fake backend for the meta device only (NCCL: cuda only).
BACKEND = "meta:fake"


def release() -> None:
    """Tear down a fake world left by an earlier rehearsal or simulation in this process (no-op otherwise)."""
    if dist.is_initialized():
        if str(dist.get_backend()).split(":")[-1] != "fake":
            raise RuntimeError("a rehearsal needs a process without a real torch.distributed group (found backend "
                               f"{dist.get_backend()!r}); run it in its own process")
        destroy_mesh(release=True)
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_world(world_size: int, rank: int, parallel: MeshConfig, device: str = "meta") -> Iterator[Mesh]:
    """Be rank `rank` of `world_size` on a `meta:fake` group, with lctrain's mesh for `parallel` built on it and
    meta tensors dispatched as GPU tensors (`lctrain.ops.registry.meta_as_gpu`). Torn down on exit.
    `device="cpu"`: a `cpu:fake` group instead, for fake CPU tensors taking the CPU paths (the planner uses it to
    compare a simulated step with a real gloo run)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    release()
    backend = BACKEND if device == "meta" else f"{device}:fake"
    dist.init_process_group(backend, store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_mesh(parallel)
        with meta_as_gpu() if device == "meta" else contextlib.nullcontext():
            yield mesh
    finally:
        release()
