"""Fused, GQA-grouped QKV projection split over TP by key/value groups.

The full weight `[(h + 2 * h_kv) * d, hidden]` is laid out group by group: for each of the h_kv groups,
its h / h_kv query heads, then its key head, then its value head. A contiguous TP split of the rows then
gives every rank whole groups (h_kv / tp of them), so query head i pairs with kv head i // (h / h_kv) on
every TP size, and no rank needs another's heads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear

from lctrain.models.config import ModelConfig
from lctrain.models.tensor_parallel import normal_init


class GroupedQKV(torch.nn.Module):
    """x `[b, s, hidden]` -> q `[b, s, h/tp, d]`, k and v `[b, s, h_kv/tp, d]` (this rank's heads)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: dist.ProcessGroup, tp: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_per_group = cfg.num_heads // cfg.num_kv_heads
        self.local_groups = cfg.num_kv_heads // tp
        self.proj = ColumnParallelLinear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                                         config=mp, init_method=normal_init(cfg.init_std), bias=False,
                                         gather_output=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = x.shape
        qkv, _ = self.proj(x)  # [b, s, (h + 2 h_kv) d / tp]
        qkv = qkv.view(b, s, self.local_groups, self.q_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_group].reshape(b, s, self.local_groups * self.q_per_group, self.head_dim)
        k = qkv[:, :, :, self.q_per_group].contiguous()  # [b, s, h_kv/tp, d]
        v = qkv[:, :, :, self.q_per_group + 1].contiguous()
        return q, k, v
