"""Rehearse a GPU training run on a CPU-only machine: the real `lctrain train` code path as one rank of an N-GPU
job, on meta tensors (shapes and storages, no data) over a process group that, like NCCL, has no CPU backend.

    lctrain rehearse configs/cluster-demo.yaml --gpus 64 [--rank R] [--steps K] [--hardware h100] [--json]

    from lctrain.rehearse import rehearse
    report = rehearse(cfg, gpus=64)          # Report: peak_bytes, states_bytes, activations_bytes, ...
    assert report.ok, report.findings

The pieces, for other tools (the planner takes its memory from the same machinery):

- `fake_world(world_size, rank, parallel)` (world.py): context manager; `meta:fake` process group of the job's
  size, lctrain's real `init_mesh`, meta tensors dispatched as GPU tensors (`lctrain.ops.registry.meta_as_gpu`);
  yields the Mesh.
- `MemoryWatcher` (watch.py): TorchDispatchMode; every device storage created and freed, by source line and
  category (param | grad | optimizer | comm | activation); `.peak`, `.category_peak`, `.largest(10)`, `.adopt()`.
- the sync watcher: `lctrain.testing.hot_path.watch_syncing_ops` (one detector for tests and rehearsal: ops whose
  CUDA kernels read the device back, by source line); the collective watcher: `hot_path.watch_collectives`
  (per call: group, bytes, devices, line; a CPU-tensor collective raises `CollectiveOnHostTensor` naming the line).
- `DeviceDtypeWatcher` (watch.py): CPU tensors fed to device ops (hidden host-to-device copies), fp32 matmul or
  attention under bf16, explicit host-to-device copies by line.
- `StandInEngine`, `standin_builder`, `StandInText` (standin.py): DeepSpeed's engine and an unprepared corpus,
  with the same collectives and bytes (module docstring there says exactly which).
- `Report` (report.py): the dataclass behind `--json` (`peak_bytes`, `states_bytes`, `activations_bytes`,
  `comm_buffer_bytes`, `layers`, `largest_allocations`, `collectives_per_step`, `stand_ins`, `findings`).
- `rehearse(cfg, gpus, ...)` (rehearsal.py): all of the above around the trainer's own pieces
  (`lctrain.train.trainer`: choose_checkpoint, build_run_engine, step_batches, train_step, read_losses, the
  preemption agreement, evaluate) for K steps, one eval and a checkpoint save's collectives.

Failure classes (a finding each, naming the source line): `host_sync` (a syncing op in a steady-state step: every
step but the first, outside the log point), `cpu_tensor_in_device_op`, `cpu_collective`, `fp32_matmul`.
"""
from lctrain.rehearse.rehearsal import HARDWARE, RehearsalError, busiest_rank, rehearse
from lctrain.rehearse.report import CollectiveReport, LayerReport, Report
from lctrain.rehearse.standin import StandInEngine, StandInText, standin_builder
from lctrain.rehearse.watch import DeviceDtypeWatcher, Finding, MemoryWatcher, Phase
from lctrain.rehearse.world import fake_world

__all__ = ["HARDWARE", "CollectiveReport", "DeviceDtypeWatcher", "Finding", "LayerReport", "MemoryWatcher", "Phase",
           "RehearsalError", "Report", "StandInEngine", "StandInText", "busiest_rank", "fake_world", "rehearse",
           "standin_builder"]
