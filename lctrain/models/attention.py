"""Softmax-attention token mixer: GQA + RoPE, heads split over TP, sequence over CP.

Each TP rank projects its own heads (whole GQA groups), rotates q and k with the tokens' global
positions, and runs the configured context-parallel attention (all-gather K/V, ring, or Ulysses from
`lctrain.sp`) on those heads within the CP group; the output projection is a RowParallelLinear. A window layer
("W") is the same mixer with `window=`: query i sees keys i - W < j <= i, through `model.window_sp` (the halo
exchange by default).
"""
from __future__ import annotations

import math

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import RowParallelLinear

from lctrain import sp
from lctrain.models.config import ModelConfig
from lctrain.models.packing import Documents, packed_argument, packed_mode, per_document
from lctrain.models.qkv import GroupedQKV
from lctrain.models.rope import apply_rope
from lctrain.models.tensor_parallel import scaled_init
from lctrain.parallel.mesh import Mesh


#: The SP function of each softmax method (looked up in lctrain.sp when a layer is built).
SOFTMAX_SP_FNS = {"allgather": "allgather_attention", "ring": "ring_attention", "ulysses": "ulysses_attention"}
#: The SP function of each method for sliding-window layers (all take `window=`).
WINDOW_SP_FNS = {"halo": "halo_attention", "allgather": "allgather_attention", "ring": "ring_attention"}


class SoftmaxAttention(torch.nn.Module):
    """x `[b, s_local, hidden]` (replicated over TP) -> `[b, s_local, hidden]`."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mesh: Mesh, cp_layout: str,
                 window: int | None = None):
        super().__init__()
        self.window = window
        self.mesh, self.cp_layout = mesh, cp_layout
        self.method = cfg.window_sp if window else cfg.softmax_sp
        fns = WINDOW_SP_FNS if window else SOFTMAX_SP_FNS
        if self.method not in fns:
            raise ValueError(f"unknown {'window' if window else 'softmax'} SP method {self.method!r}")
        self.sp_fn = getattr(sp, fns[self.method])
        self.packed_mode = packed_mode(self.sp_fn, mesh.cp)
        self.softmax_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.qkv = GroupedQKV(cfg, mp, mesh.tp_group, mesh.tp)
        self.out = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, config=mp,
                                     init_method=scaled_init(cfg.init_std, cfg.num_layers), bias=False,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=mesh.tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: Documents | None = None) -> torch.Tensor:
        """`cos`/`sin`: RoPE tables `[s, d]` or `[b, s, d]`; `docs`: the packed batch's documents (or None)."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x)  # [b, s, h/tp, d], [b, s, h_kv/tp, d] x 2
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kw = dict(group=self.mesh.cp_group, causal=True, softmax_scale=self.softmax_scale)
        if self.window:
            kw["window"] = self.window
        if docs is None:
            o = self.sp_fn(q, k, v, layout=self.cp_layout, **kw)
        elif self.packed_mode == "native":
            o = self.sp_fn(q, k, v, layout=self.cp_layout, cu_seqlens=packed_argument(self.sp_fn, docs), **kw)
        else:  # one CP rank: each document on its own
            o = per_document(self.sp_fn, q, k, v, docs.bounds, layout="contiguous", **kw)
        out, _ = self.out(o.reshape(b, s, -1).contiguous())  # [b, s, hidden]
        return out
