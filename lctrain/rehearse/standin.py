"""Stand-ins for what cannot run on meta tensors: DeepSpeed's engine, and a corpus that is not prepared here.

DeepSpeed's engine (`deepspeed.initialize`) moves the model, flattens parameters into its own buffers and calls
CUDA/accelerator APIs, none of which runs on meta tensors over a fake group. `StandInEngine` replaces exactly that
piece, with the interface the trainer uses (`engine(...)`, `backward`, `step`, `eval`/`train`, `module`,
`optimizer.param_groups`, `get_global_grad_norm`), and issues the collectives ZeRO issues, through
lctrain.parallel.comm (so they are counted), and allocates the bytes ZeRO allocates:

    P = this rank's parameters (its TP shard), W = the DP x CP group size, p = ceil(P / W), d = train dtype bytes
    params      P x d  (ZeRO-3: p x d, gathered per module for its forward and backward)
    grads       P x d  (the autograd gradients; ZeRO-2/3 reduce them bucket by bucket and keep p x 4 in fp32)
    optimizer   ZeRO 1-3: fp32 master p x 4 + Adam moments 2 x p x 4 (+ fp32 grad partition p x 4 counted as grads)
                ZeRO-0 (fp32 only): Adam moments 2 x P x 4
    per step    ZeRO 0/1: all_reduce of the gradients (buckets of zero_optimization.reduce_bucket_size, default 5e8
                elements); ZeRO-2/3: reduce_scatter of the same buckets; ZeRO 1/2: all_gather of the updated p x d
                partitions; ZeRO-3: all_gather of each module's p x d in forward and in backward; all: an all_reduce
                of the squared gradient norm (4 bytes) over DP x CP, and over TP when TP > 1.

DeepSpeed's alignment padding of partitions and its bucket boundaries between parameters are not modelled (within
a few KiB); the Adam update runs no math on meta (FusedAdam's kernels make no temporaries of that size).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import numpy as np
import torch

from lctrain.parallel import comm
from lctrain.parallel.mesh import Mesh
from lctrain.train.config import TrainConfig
from lctrain.train.engine import deepspeed_config, param_groups

#: DeepSpeed's default bucket sizes (elements), used when train.deepspeed does not set them.
DEFAULT_BUCKET = int(5e8)


class _Optimizer:
    """What `lctrain.train.engine.set_lr` touches: the AdamW parameter groups."""

    def __init__(self, groups: list[dict]):
        self.param_groups = groups


class StandInEngine:
    """DeepSpeed's engine as the rehearsal sees it: the model's forward/backward are real; ZeRO's collectives and
    memory are issued and allocated as described in the module docstring."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, mesh: Mesh, grad_accum: int, dtype: torch.dtype,
                 device: torch.device, on_alloc: Callable[[torch.Tensor, str], None] | None = None):
        self.module, self.cfg, self.mesh, self.grad_accum = model, cfg, mesh, grad_accum
        self.stage, self.dtype, self.device = cfg.zero_stage, dtype, device
        self.on_alloc = on_alloc or (lambda t, category: None)
        ds = deepspeed_config(cfg, grad_accum).get("zero_optimization", {})
        self.reduce_bucket = int(ds.get("reduce_bucket_size", DEFAULT_BUCKET))
        self.gather_bucket = int(ds.get("allgather_bucket_size", DEFAULT_BUCKET))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.world = comm.group_size(mesh.dp_cp_group)
        self.shard = math.ceil(self.numel / self.world)
        self.optimizer = _Optimizer(param_groups(model, cfg.weight_decay))
        self.micro = 0
        self.states: dict[str, torch.Tensor] = {}
        fp32 = torch.float32
        if self.stage >= 1:
            for name in ("master", "exp_avg", "exp_avg_sq"):
                self._alloc(name, self.shard, fp32, "optimizer")
        else:
            for name in ("exp_avg", "exp_avg_sq"):
                self._alloc(name, self.numel, fp32, "optimizer")
        if self.stage >= 2:
            self._alloc("grad_partition", self.shard, fp32, "grad")
        self._hooks = []
        if self.stage >= 2:
            # ZeRO-2/3 reduce each gradient as it is produced and keep only their partition.
            self._hooks = [p.register_post_accumulate_grad_hook(self._drop_grad) for p in self.params]
        if self.stage == 3:
            self._partition_params()

    # ---- memory
    def _alloc(self, name: str, numel: int, dtype: torch.dtype, category: str) -> torch.Tensor:
        t = torch.empty(numel, dtype=dtype, device=self.device)
        self.states[name] = t
        self.on_alloc(t, category)
        return t

    def _drop_grad(self, p: torch.Tensor) -> None:
        p.grad = None

    def _partition_params(self) -> None:
        """ZeRO-3: each module keeps 1/W of its parameters; the full ones exist only inside its forward/backward."""
        self._alloc("param_partition", self.shard, self.dtype, "param")
        self._full = {id(p): p.data for p in self.params}
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        # As build_engine's deepspeed.zero.register_external_parameter: a module that reads another's parameter.
        external: dict[int, list[torch.Tensor]] = {}
        for user, param in getattr(self.module, "shared_parameters", lambda: [])():
            external.setdefault(id(user), []).append(param)
        for module in self.module.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self._full]
            own += [p for p in external.get(id(module), []) if id(p) in self._full]
            if own:
                module.register_forward_pre_hook(lambda m, a, own=own: self._gather(own))
                module.register_forward_hook(lambda m, a, o, own=own: self._release(own))
                module.register_full_backward_pre_hook(lambda m, g, own=own: self._gather(own))
                module.register_full_backward_hook(lambda m, gi, go, own=own: self._release(own))
        self._gathered: dict[int, torch.Tensor] = {}

    def _gather(self, own: list[torch.Tensor]) -> None:
        # The gathered buffer (W x the partition) lives while the module runs, as ZeRO-3's does.
        n = sum(self._full[id(p)].numel() for p in own)
        part = torch.empty(math.ceil(n / self.world), dtype=self.dtype, device=self.device)
        self._gathered[id(own[0])] = comm.all_gather(part, group=self.mesh.dp_cp_group)
        for p in own:
            p.data = self._full[id(p)]

    def _release(self, own: list[torch.Tensor]) -> None:
        self._gathered.pop(id(own[0]), None)
        for p in own:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    # ---- DeepSpeed's engine interface
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()
        if self.stage >= 2:
            self._reduce("reduce_scatter")

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if self.stage <= 1:
            self._reduce("all_reduce")
        norm = torch.zeros(1, dtype=torch.float32, device=self.device)
        comm.all_reduce(norm, group=self.mesh.dp_cp_group)
        if self.mesh.tp > 1:
            comm.all_reduce(norm, group=self.mesh.tp_group)
        if self.stage in (1, 2):
            for numel in _buckets(self.shard * self.world, self.gather_bucket):
                part = torch.empty(numel // self.world, dtype=self.dtype, device=self.device)
                self.on_alloc(part, "comm")
                comm.all_gather(part, group=self.mesh.dp_cp_group)
        for p in self.params:
            p.grad = None

    def _reduce(self, op: str) -> None:
        # Gradient buckets: the real bytes of the step's gradients, in DeepSpeed's bucket sizes.
        for numel in _buckets(self.shard * self.world, self.reduce_bucket):
            bucket = torch.empty(numel, dtype=self.dtype, device=self.device)
            self.on_alloc(bucket, "comm")
            if op == "all_reduce":
                comm.all_reduce(bucket, group=self.mesh.dp_cp_group)
            else:
                comm.reduce_scatter(bucket, group=self.mesh.dp_cp_group)

    def get_global_grad_norm(self) -> float:
        return 0.0

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _buckets(total: int, bucket: int) -> list[int]:
    """Sizes of the buckets `total` elements go in (full buckets, then the rest)."""
    full, rest = divmod(total, bucket)
    return [bucket] * full + ([rest] if rest else [])


def standin_builder(dtype: torch.dtype, on_alloc: Callable[[torch.Tensor, str], None] | None = None,
                    after_build: Callable[[torch.nn.Module], None] | None = None,
                    quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """A `builder` for `lctrain.train.trainer.build_run_engine`: the real model built on meta, cast to `dtype`,
    inside a `StandInEngine`. The build runs inside `quiet()` (a run builds on the host: its temporaries are not
    device memory)."""

    def build(model_fn, cfg: TrainConfig, mesh: Mesh, grad_accum: int, device):
        with quiet(), torch.device("meta"):
            model = model_fn().to(dtype)
        if after_build is not None:
            after_build(model)
        return model, StandInEngine(model, cfg, mesh, grad_accum, dtype, torch.device("meta"), on_alloc)

    return build


#: The document lengths assumed when packed text data is not prepared here: log-normal, median 1024 tokens,
#: sigma 1.0 (mean ~1700), each at least 16 tokens; documents longer than the sequence are cut, as packing does.
DEFAULT_DOC_MEDIAN, DEFAULT_DOC_SIGMA, DEFAULT_DOC_MIN = 1024, 1.0, 16


class StandInText:
    """Samples of a text corpus that is not prepared on this machine: `[s]` token ids (0), labels, loss mask, and
    with `document_mask` packed `cu_seqlens` from the default document-length distribution (seeded per index)."""

    def __init__(self, seq_len: int, document_mask: bool, seed: int = 0):
        self.seq_len, self.document_mask, self.seed = seq_len, document_mask, seed

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.seq_len
        out = {"input_ids": torch.zeros(s, dtype=torch.int64), "labels": torch.zeros(s, dtype=torch.int64),
               "loss_mask": torch.ones(s, dtype=torch.float32)}
        if self.document_mask:
            rng = np.random.default_rng([self.seed, int(index)])
            bounds = [0]
            while bounds[-1] < s:
                n = max(DEFAULT_DOC_MIN, int(rng.lognormal(math.log(DEFAULT_DOC_MEDIAN), DEFAULT_DOC_SIGMA)))
                bounds.append(min(s, bounds[-1] + n))
            out["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
        return out
