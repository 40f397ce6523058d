"""Linear-attention token mixer (Lightning Attention / TransNormerLLM style), heads over TP, sequence over CP.

    q, k = phi(x W_q), phi(x W_k);  v = x W_v                       (phi: the configured feature map)
    o_t  = q_t . sum_{s<=t} lambda_h^(t-s) k_s^T v_s                 (per head; lambda_h = 1 without decay)
    out  = W_o [ rmsnorm_head(o) * act(x W_g) ]                       (output norm and gate optional)

The QKV projection is the same GQA-grouped one as the softmax layers (so a pattern can swap mixers
without changing shapes); k and v are repeated to the query heads before the recurrence. Decay rates are
the fixed per-head lambdas of `default_log_decay` (optionally depth-scaled), each TP rank taking its heads'
slice. The
per-head output norm's scale is split over TP with the heads, so no TP-replicated parameter sees only
its rank's heads. The CP part is LASP-2 (one all-gather of memory states) or LASP-1 (state ring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from lctrain import sp
from lctrain.models.config import ModelConfig
from lctrain.models.norm import rms_norm
from lctrain.models.packing import Documents, packed_argument, packed_mode, per_document
from lctrain.models.qkv import GroupedQKV
from lctrain.models.tensor_parallel import mark_tp_split, normal_init, scaled_init
from lctrain.ops.linear_attention import default_log_decay
from lctrain.parallel.mesh import Mesh

FEATURE_MAP_FNS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    "silu": F.silu,
    "relu": F.relu,
}
GATE_FNS = {"sigmoid": torch.sigmoid, "silu": F.silu}


#: The SP function of each linear method (looked up in lctrain.sp when a layer is built).
LINEAR_SP_FNS = {"lasp2": "lasp2_linear_attention", "lasp1": "lasp1_linear_attention",
                 "lasp2_tree": "lasp2_linear_attention"}


class LinearAttention(torch.nn.Module):
    """x `[b, s_local, hidden]` (replicated over TP) -> `[b, s_local, hidden]`."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mesh: Mesh, cp_layout: str, layer_idx: int):
        super().__init__()
        self.mesh, self.cp_layout, self.method = mesh, cp_layout, cfg.linear_sp
        if self.method not in LINEAR_SP_FNS:
            raise ValueError(f"unknown linear SP method {self.method!r}")
        self.sp_fn = getattr(sp, LINEAR_SP_FNS[self.method])
        self.packed_mode = packed_mode(self.sp_fn, mesh.cp)
        self.eps, self.head_dim = cfg.norm_eps, cfg.head_dim
        self.q_per_group = cfg.num_heads // cfg.num_kv_heads
        self.local_heads = cfg.num_heads // mesh.tp
        self.feature_map = FEATURE_MAP_FNS[cfg.feature_map]
        self.gate_fn = GATE_FNS.get(cfg.linear_output_gate)
        self.log_decay = None
        if cfg.linear_decay != "none":
            depth = {}
            if cfg.linear_decay == "lightning_depth":
                depth = dict(layer_idx=layer_idx, num_layers=cfg.num_layers)
            first = mesh.tp_rank * self.local_heads
            self.log_decay = default_log_decay(cfg.num_heads, **depth)[first:first + self.local_heads]
        self.qkv = GroupedQKV(cfg, mp, mesh.tp_group, mesh.tp)
        self.gate = None
        if self.gate_fn is not None:
            self.gate = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, config=mp,
                                             init_method=normal_init(cfg.init_std), bias=False,
                                             gather_output=False, tp_group=mesh.tp_group)
        self.norm_weight = None
        if cfg.linear_output_norm:
            self.norm_weight = mark_tp_split(torch.nn.Parameter(torch.ones(self.local_heads * cfg.head_dim)))
        self.out = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, config=mp,
                                     init_method=scaled_init(cfg.init_std, cfg.num_layers), bias=False,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=mesh.tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        """`cos` and `sin` (the softmax layers' RoPE tables) are accepted and unused: no RoPE here. `docs`: the
        packed batch's documents (the state restarts at each), or None."""
        b, s, _ = x.shape
        q, k, v = self.qkv(x)  # [b, s, h/tp, d], [b, s, h_kv/tp, d] x 2
        q, k = self.feature_map(q), self.feature_map(k)
        if self.q_per_group > 1:
            k = k.repeat_interleave(self.q_per_group, dim=2)  # [b, s, h/tp, d]
            v = v.repeat_interleave(self.q_per_group, dim=2)
        log_decay = None
        if self.log_decay is not None:
            # A fixed float32 constant, not a buffer: a bf16 cast of the model must not round the decay.
            if self.log_decay.device != q.device:
                self.log_decay = self.log_decay.to(q.device)
            log_decay = self.log_decay.to(torch.promote_types(q.dtype, torch.float32))  # [h/tp]
        kw = dict(log_decay=log_decay, group=self.mesh.cp_group, causal=True)
        if self.method == "lasp2_tree":
            kw["scan"] = "tree"
        layout = {} if self.method == "lasp1" else {"layout": self.cp_layout}  # LASP-1 is contiguous only
        if docs is None:
            o = self.sp_fn(q, k, v, **layout, **kw)  # [b, s, h/tp, d]
        elif self.packed_mode == "native":
            o = self.sp_fn(q, k, v, cu_seqlens=packed_argument(self.sp_fn, docs), **layout, **kw)
        else:  # one CP rank: each document on its own (a fresh state per document)
            one_rank = {} if self.method == "lasp1" else {"layout": "contiguous"}
            o = per_document(self.sp_fn, q, k, v, docs.bounds, **one_rank, **kw)
        if self.norm_weight is not None:
            o = rms_norm(o, self.norm_weight.view(self.local_heads, self.head_dim), self.eps)
        if self.gate is not None:
            g, _ = self.gate(x)  # [b, s, h d / tp]
            o = o * self.gate_fn(g).view(b, s, self.local_heads, self.head_dim)
        out, _ = self.out(o.reshape(b, s, -1).contiguous())  # [b, s, hidden]
        return out
