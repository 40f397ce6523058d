"""Gated linear attention, token by token: the definition the chunked form (gla.py) is tested against.

Per head, with log gates g_t <= 0 (a_t = exp(g_t)), state S of shape [dk, dv] and S_{-1} = S0:

    S_t = diag(a_t) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

The gate is one of three shapes: `[h]` (a fixed decay per head: lightning attention, equal to
`linear_attention(log_decay=g)`), `[b, s, h]` (a scalar per head and token: Mamba2 / simple GLA) or
`[b, s, h, dk]` (a vector over the key dimension: GLA). Unrolled, o_t = scale * q_t (prod_{r<=t} a_r) S0
+ scale * sum_{s<=t} q_t (prod_{s<r<=t} a_r) k_s^T v_s: the gate of token t already acts on the state it
receives, so a fixed decay gives lambda^(t-s) and lambda^(t+1) on S0 (lctrain's linear attention).
Math in float64 for float64 inputs, float32 otherwise; gradients through autograd.
"""
from __future__ import annotations

import torch

from lctrain.ops.linear_attention_ref import compute_dtype

#: The gate kinds, by the shape of g: "none" (no gate), "head" [h], "scalar" [b, s, h], "vector" [b, s, h, dk].
GATE_KINDS = ("none", "head", "scalar", "vector")


def gate_kind(g: torch.Tensor | None, q: torch.Tensor) -> str:
    """Which gate `g` is for queries `q` `[b, s, h, dk]`; ValueError for any other shape."""
    if g is None:
        return "none"
    b, s, h, dk = q.shape
    for kind, shape in (("head", (h,)), ("scalar", (b, s, h)), ("vector", (b, s, h, dk))):
        if tuple(g.shape) == shape:
            return kind
    raise ValueError(f"log gate g must be [h] = [{h}], [b, s, h] = {[b, s, h]} or [b, s, h, dk] = {[b, s, h, dk]}, "
                     f"got {list(g.shape)}")


def gate_as_vector(g: torch.Tensor | None, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Any gate as a `[b, s, h, dk]` log gate in `dtype` (a view where possible; differentiable)."""
    b, s, h, dk = q.shape
    kind = gate_kind(g, q)
    if kind == "none":
        return torch.zeros(b, s, h, dk, dtype=dtype, device=q.device)
    g = g.to(dtype)
    if kind == "head":
        return g[None, None, :, None].expand(b, s, h, dk)
    if kind == "scalar":
        return g[..., None].expand(b, s, h, dk)
    return g


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                  scale: float = 1.0, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention by the literal recurrence (one step per token).

    Args:
        q, k: `[b, s, h, dk]`.
        v: `[b, s, h, dv]`.
        g: log gate <= 0: `[h]`, `[b, s, h]` or `[b, s, h, dk]`; None means no gate (a_t = 1).
        scale: multiplies the output (lctrain's convention is 1: the model applies its own scaling).
        initial_state: `[b, h, dk, dv]` entering state, or None (zeros).
        output_final_state: also return S_{s-1}.
    Returns:
        `o` `[b, s, h, dv]` in v's dtype; the final state `[b, h, dk, dv]` (float32, float64 for float64
        inputs) or None.
    """
    cdt = compute_dtype(q.dtype)
    b, n, h, dk = q.shape
    a = torch.exp(gate_as_vector(g, q, cdt))  # [b, n, h, dk]
    qf, kf, vf = (x.to(cdt) for x in (q, k, v))
    state = (initial_state.to(cdt) if initial_state is not None
             else torch.zeros(b, h, dk, v.shape[-1], dtype=cdt, device=q.device))
    outs = []
    for t in range(n):
        state = a[:, t, :, :, None] * state + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # [b, h, dk, dv]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1) * scale  # [b, n, h, dv]
    return o.to(v.dtype), (state if output_final_state else None)
