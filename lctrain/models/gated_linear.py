"""Gated linear-attention token mixers: GatedDeltaNet ("D") and GLA ("G"); heads over TP, sequence over CP.

    q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))   short causal depthwise conv (kernel K)
    GatedDeltaNet:  q, k = l2norm(q) / sqrt(d), l2norm(k);  beta = sigmoid(x W_b)            [b, s, h]
                    g = -exp(A_log) * softplus(x W_a + dt_bias)                               [b, s, h] (log gate)
                    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,  o_t = S_t^T q_t
    GLA:            q = q / sqrt(d);  g = logsigmoid(x W_gk) / 16                             [b, s, h, d]
                    S_t = diag(exp(g_t)) S_(t-1) + k_t^T v_t,  o_t = q_t S_t
    out = W_o [ rmsnorm_head(o) * silu(x W_g) ]

as in the GatedDeltaNet paper / Qwen3-Next and GLA (whose low-rank gate projection is full rank here, so every
weight splits cleanly over TP). The QKV projection is the GQA-grouped one of the other mixers; k and v are
repeated to the query heads after the convolution. The sequence crosses CP ranks twice: the convolution's
halo (K-1 tokens from the neighbouring chunk(s), counted P2P, short_conv.py) and the recurrence's state
(LASP-2 over chunk maps, `lctrain.sp.lasp2_delta`: one all-gather forward, one backward; or the LASP-1 ring
with linear_sp="lasp1", contiguous layout). Packed documents (native on any CP size): the convolution's taps
that reach into the previous document are zeroed and the state restarts at each document (`cu_seqlens=`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from lctrain import sp
from lctrain.models.config import ModelConfig
from lctrain.models.norm import rms_norm
from lctrain.models.qkv import GroupedQKV
from lctrain.models.short_conv import causal_conv_cp
from lctrain.models.tensor_parallel import mark_tp_split, normal_init, scaled_init
from lctrain.parallel.mesh import Mesh

#: Mixer letters of the layer pattern handled here.
GATED_MIXERS = ("D", "G")
#: GLA's gate temperature: g = logsigmoid(.) / 16 keeps most gates close to 1 at init (as in GLA).
GLA_GATE_NORMALIZER = 16.0


def _split(full: torch.Tensor, rank: int, tp: int) -> torch.nn.Parameter:
    """This TP rank's contiguous slice (dim 0) of a full tensor drawn on every rank, tagged as TP-split."""
    n = full.shape[0] // tp
    return mark_tp_split(torch.nn.Parameter(full[rank * n:(rank + 1) * n].clone()))


class GatedLinearMixer(torch.nn.Module):
    """x `[b, s_local, hidden]` (replicated over TP) -> `[b, s_local, hidden]`; kind "D" or "G"."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, mesh: Mesh, cp_layout: str, kind: str):
        super().__init__()
        if kind not in GATED_MIXERS:
            raise ValueError(f"unknown gated mixer {kind!r}; expected one of {GATED_MIXERS}")
        if cfg.linear_sp == "lasp1" and mesh.cp > 1 and cp_layout != "contiguous":
            raise ValueError("linear_sp='lasp1' needs cp_layout='contiguous' (its state ring follows rank order)")
        self.kind, self.mesh, self.cp_layout, self.method = kind, mesh, cp_layout, cfg.linear_sp
        self.packed_mode = "native"  # conv taps masked per document, SP calls take cu_seqlens
        self.eps, self.head_dim = cfg.norm_eps, cfg.head_dim
        self.q_per_group = cfg.num_heads // cfg.num_kv_heads
        self.local_heads = cfg.num_heads // mesh.tp
        tp, r = mesh.tp, mesh.tp_rank
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = GroupedQKV(cfg, mp, mesh.tp_group, mesh.tp)
        # Depthwise conv weights [channels, K], drawn in full (Conv1d's default bound 1/sqrt(K)) and split by heads.
        bound = 1.0 / math.sqrt(cfg.short_conv_size)
        self.conv_q, self.conv_k, self.conv_v = (
            _split(torch.empty(n * d, cfg.short_conv_size).uniform_(-bound, bound), r, tp) for n in (h, hkv, hkv))

        def column(out_features: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(cfg.hidden_size, out_features, config=mp, init_method=normal_init(cfg.init_std),
                                        bias=False, gather_output=False, tp_group=mesh.tp_group)

        if kind == "D":
            self.beta_proj = column(h)
            self.decay_proj = column(h)
            # Mamba2's decay parametrisation: A in [1, 16], dt in [1e-3, 1e-1] log-uniform, dt_bias = softplus^-1(dt).
            self.A_log = _split(torch.empty(h).uniform_(1.0, 16.0).log(), r, tp)
            dt = torch.exp(torch.empty(h).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = _split(dt + torch.log(-torch.expm1(-dt)), r, tp)
        else:
            self.gk_proj = column(h * d)
        self.gate = column(h * d)
        self.norm_weight = mark_tp_split(torch.nn.Parameter(torch.ones(self.local_heads * d)))
        self.out = RowParallelLinear(h * d, cfg.hidden_size, config=mp,
                                     init_method=scaled_init(cfg.init_std, cfg.num_layers), bias=False,
                                     input_is_parallel=True, skip_bias_add=False, tp_group=mesh.tp_group)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """silu(causal conv) of `[b, s, n, d]` heads, across the CP group (`positions`: within-document)."""
        b, s, n, d = x.shape
        m = self.mesh
        y = causal_conv_cp(x.reshape(b, s, n * d), weight.to(x.dtype), m.cp_group, self.cp_layout, m.cp_rank, m.cp,
                           positions)
        return F.silu(y).view(b, s, n, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                docs=None) -> torch.Tensor:
        """`cos`, `sin` (RoPE tables of the softmax layers) are unused: no RoPE here. `docs`: the packed batch's
        documents (convolution and state restart at each), or None."""
        b, s, _ = x.shape
        pos = docs.positions if docs is not None else None
        cu = {"cu_seqlens": docs} if docs is not None else {}
        q, k, v = self.qkv(x)  # [b, s, h/tp, d], [b, s, h_kv/tp, d] x 2
        q, k, v = (self._conv(t, w, pos) for t, w in ((q, self.conv_q), (k, self.conv_k), (v, self.conv_v)))
        if self.q_per_group > 1:
            k = k.repeat_interleave(self.q_per_group, dim=2)  # [b, s, h/tp, d]
            v = v.repeat_interleave(self.q_per_group, dim=2)
        gdt = torch.promote_types(x.dtype, torch.float32)  # gates in at least float32
        scale = self.head_dim ** -0.5
        group, layout = self.mesh.cp_group, self.cp_layout
        scan = {"scan": "tree"} if self.method == "lasp2_tree" else {}
        if self.kind == "D":
            q = F.normalize(q, dim=-1, eps=1e-6) * scale
            k = F.normalize(k, dim=-1, eps=1e-6)
            beta = torch.sigmoid(self.beta_proj(x)[0])  # [b, s, h/tp]
            a, _ = self.decay_proj(x)
            g = -torch.exp(self.A_log.to(gdt)) * F.softplus(a.to(gdt) + self.dt_bias.to(gdt))  # [b, s, h/tp]
            if self.method == "lasp1":
                o = sp.lasp1_delta_attention(q, k, v, beta.to(q.dtype), log_decay=g, group=group, **cu)
            else:
                o = sp.lasp2_delta_attention(q, k, v, beta.to(q.dtype), log_decay=g, group=group, layout=layout, **cu,
                                             **scan)
        else:
            gk, _ = self.gk_proj(x)
            g = F.logsigmoid(gk.to(gdt)).view(b, s, self.local_heads, self.head_dim) / GLA_GATE_NORMALIZER
            if self.method == "lasp1":
                o = sp.lasp1_linear_attention(q * scale, k, v, log_decay=g, group=group, **cu)
            else:
                o = sp.lasp2_linear_attention(q * scale, k, v, log_decay=g, group=group, layout=layout, **cu,
                                              **scan)
        o = rms_norm(o, self.norm_weight.view(self.local_heads, self.head_dim), self.eps)
        gate, _ = self.gate(x)  # [b, s, h d / tp]
        o = o * F.silu(gate).view(b, s, self.local_heads, self.head_dim)
        out, _ = self.out(o.reshape(b, s, -1).contiguous())  # [b, s, hidden]
        return out
