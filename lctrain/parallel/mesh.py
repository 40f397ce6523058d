"""The DP x CP x TP process mesh, built by Megatron-core's `parallel_state`.

Rank order is Megatron's default "tp-cp-ep-dp-pp": TP ranks are adjacent (so a TP group stays inside a
node when ranks are placed node-major), then CP, then DP. Megatron calls context parallelism "CP"; its
own `sequence_parallel` flag is something else (splitting TP activations) and is not used here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lctrain.parallel import comm


@dataclass
class MeshConfig:
    """Sizes of the parallel dimensions; DP is derived as world / (tp * cp)."""

    tp: int = 1
    """Tensor-parallel size (heads and MLP columns split across these ranks)."""
    cp: int = 1
    """Context-parallel size (the sequence split across these ranks)."""
    cp_layout: str = "zigzag"
    """How the sequence is split over CP: "zigzag" (causal load balance) or "contiguous"."""
    backend: str | None = None
    """torch.distributed backend; None picks nccl when CUDA is available, else gloo."""
    timeout_s: float = 600.0
    """Timeout of the process groups and of every counted collective."""

    def validate(self, world_size: int) -> int:
        """Check the layout against `world_size` (no communication); return the DP size."""
        for name in ("tp", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name} must be an integer >= 1, got {v!r}")
        if world_size % (self.tp * self.cp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp*cp = {self.tp}*{self.cp} = {self.tp * self.cp}"
            )
        if self.cp_layout not in ("zigzag", "contiguous"):
            raise ValueError(f"parallel.cp_layout must be 'zigzag' or 'contiguous', got {self.cp_layout!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"parallel.backend must be gloo or nccl, got {self.backend!r}")
        return world_size // (self.tp * self.cp)


@dataclass
class Mesh:
    """The groups and this rank's coordinates in them."""

    world_size: int
    rank: int
    tp: int
    cp: int
    dp: int
    tp_group: dist.ProcessGroup | None
    cp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    dp_cp_group: dist.ProcessGroup | None
    """DP x CP: weights are replicated across it, so gradients are reduced (and ZeRO shards) over it."""

    @property
    def tp_rank(self) -> int:
        return comm.group_rank(self.tp_group)

    @property
    def cp_rank(self) -> int:
        return comm.group_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return comm.group_rank(self.dp_group)


_MESH: Mesh | None = None
_MEGATRON_LAYOUT: tuple[int, int, int] | None = None  # (world, tp, cp) Megatron's groups were built for


def _set_megatron_layout(layout: tuple[int, int, int] | None) -> None:
    global _MEGATRON_LAYOUT
    _MEGATRON_LAYOUT = layout


def _release_megatron_groups() -> None:
    """Destroy the process groups Megatron created, then its bookkeeping.

    `parallel_state.destroy_model_parallel` only forgets its groups; the groups themselves (and each gloo
    group's threads) live on unless destroyed, which leaks when a process builds meshes repeatedly.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        _set_megatron_layout(None)
        return
    groups: dict[int, dist.ProcessGroup] = {}
    for value in list(vars(ps).values()):
        for g in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(g, dist.ProcessGroup) and g is not dist.group.WORLD:
                groups[id(g)] = g
    ps.destroy_model_parallel()
    for g in groups.values():
        try:
            dist.destroy_process_group(g)
        except (ValueError, RuntimeError):
            pass  # not registered with this rank (a group it is not a member of)
    _set_megatron_layout(None)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from the usual env variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT) if needed.

    NCCL takes only CUDA tensors, so on a GPU the default group carries gloo for CPU tensors beside it
    ("cpu:gloo,cuda:nccl", as torchtitan does): object collectives and CPU-side checkpoint planning work. The
    trainer's own control-plane collectives use device tensors anyway (`lctrain rehearse` checks them on a group
    with no CPU backend at all).
    """
    if comm.is_distributed():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_backend = backend
    if backend == "nccl":
        backend = "cpu:gloo,cuda:nccl"
    if device_backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # One process, no launcher: a world of 1 on a local port. The environment is left alone, so a later
        # command in the same process (a test, a notebook) is not taken for a rank of a launched job.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        return
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_mesh(cfg: MeshConfig | None = None) -> Mesh:
    """Build (or rebuild) the mesh for `cfg`; initialises torch.distributed first if needed.

    Validates the layout before any collective, so every rank raises the same clear error.
    """
    global _MESH
    cfg = cfg or MeshConfig()
    if comm.is_distributed():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = cfg.validate(world)
    init_distributed(cfg.backend, cfg.timeout_s)

    from megatron.core import parallel_state as ps

    # Megatron's groups for this layout may still be up from an earlier mesh: reuse them (building groups
    # is a collective over the whole world, and each gloo group holds threads).
    if _MEGATRON_LAYOUT != (world, cfg.tp, cfg.cp) or not ps.model_parallel_is_initialized():
        _release_megatron_groups()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            context_parallel_size=cfg.cp,
            distributed_timeout_minutes=max(1, int(cfg.timeout_s // 60)),
            create_gloo_process_groups=False,
        )
        _set_megatron_layout((world, cfg.tp, cfg.cp))
    _MESH = Mesh(
        world_size=world,
        rank=dist.get_rank(),
        tp=cfg.tp,
        cp=cfg.cp,
        dp=dp,
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
    )
    return _MESH


def get_mesh() -> Mesh | None:
    """The current mesh, or None when none was built."""
    return _MESH


def destroy_mesh(release: bool = False) -> None:
    """Forget the current mesh (torch.distributed itself stays up).

    Megatron's groups are kept for a later `init_mesh` of the same layout unless `release` is set.
    """
    global _MESH
    _MESH = None
    if release:
        _release_megatron_groups()


def cp_group_or_default(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """Resolve the `group=None` default of the SP functions: the mesh's CP group, else the whole world.

    Returns None when torch.distributed is not initialised (a single process).
    """
    if group is not None:
        return group
    if _MESH is not None:
        return _MESH.cp_group
    if comm.is_distributed():
        return dist.group.WORLD
    return None
