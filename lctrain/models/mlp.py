"""SwiGLU feed-forward, tensor parallel: down(silu(x W_gate) * (x W_up)).

The gate and up projections are one ColumnParallelLinear whose full weight is [W_gate; W_up]
(`[2 * ffn, hidden]`), split with stride 2 so each TP rank holds matching slices of both; the down
projection is a RowParallelLinear (one all-reduce of the output over TP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from lctrain.models.config import ModelConfig
from lctrain.models.tensor_parallel import normal_init, scaled_init


class SwiGLU(torch.nn.Module):
    """The MLP of a decoder block; input and output `[b, s, hidden]` replicated over TP."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: dist.ProcessGroup):
        super().__init__()
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, config=mp,
                                            init_method=normal_init(cfg.init_std), bias=False,
                                            gather_output=False, stride=2, tp_group=tp_group)
        self.down = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, config=mp,
                                      init_method=scaled_init(cfg.init_std, cfg.num_layers), bias=False,
                                      input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)  # [b, s, 2 * ffn / tp]
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down((F.silu(gate) * up).contiguous())  # [b, s, hidden]
        return out
