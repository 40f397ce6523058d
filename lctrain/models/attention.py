"""Softmax-attention token mixer: GQA + RoPE, heads split over TP, sequence over CP.

Each TP rank projects its own heads (whole GQA groups), rotates q and k with the tokens' global
positions, and runs the configured context-parallel attention (all-gather K/V, ring, or Ulysses from
`lctrain.sp`) on those heads within the CP group; the output projection is a RowParallelLinear.
"""
from __future__ import annotations

import math

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import RowParallelLinear

from lctrain import sp
from lctrain.models.config import ModelConfig
from lctrain.models.qkv import GroupedQKV
from lctrain.models.rope import apply_rope
from lctrain.models.tensor_parallel import scaled_init
from lctrain.parallel.mesh import Mesh


def softmax_context_parallel(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: Mesh,
                             layout: str, softmax_scale: float) -> torch.Tensor:
    """Causal attention of this CP rank's queries over the whole sequence with the SP `method`."""
    if method == "allgather":
        return sp.allgather_attention(q, k, v, group=mesh.cp_group, causal=True, softmax_scale=softmax_scale,
                                      layout=layout)
    if method == "ring":
        return sp.ring_attention(q, k, v, group=mesh.cp_group, causal=True, softmax_scale=softmax_scale,
                                 layout=layout)
    if method == "ulysses":
        return sp.ulysses_attention(q, k, v, group=mesh.cp_group, causal=True, softmax_scale=softmax_scale,
                                    layout=layout)
    raise ValueError(f"unknown softmax SP method {method!r}")


class SoftmaxAttention(torch.nn.Module):
    """x `[b, s_local, hidden]` (replicated over TP) -> `[b, s_local, hidden]`."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mesh: Mesh, cp_layout: str):
        super().__init__()
        self.mesh, self.cp_layout, self.method = mesh, cp_layout, cfg.softmax_sp
        self.softmax_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.qkv = GroupedQKV(cfg, mp, mesh.tp_group, mesh.tp)
        self.out = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, config=mp,
                                     init_method=scaled_init(cfg.init_std, cfg.num_layers), bias=False,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=mesh.tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x)  # [b, s, h/tp, d], [b, s, h_kv/tp, d] x 2
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = softmax_context_parallel(self.method, q, k, v, self.mesh, self.cp_layout, self.softmax_scale)
        out, _ = self.out(o.reshape(b, s, -1).contiguous())  # [b, s, hidden]
        return out
