"""The gated delta rule, token by token: the definition the chunked form (gated_delta.py) is tested against.

Per head, with log gate g_t <= 0 (a_t = exp(g_t), a scalar per head and token), write strength
beta_t in [0, 1], state S of shape [dk, dv] and S_{-1} = S0 (GatedDeltaNet):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          o_t = scale * S_t^T q_t

i.e. decay the state, erase what it holds along k_t, write v_t there. beta = 0 leaves only the decay;
g = 0 is the (ungated) delta rule. Math in float64 for float64 inputs, float32 otherwise; autograd.
"""
from __future__ import annotations

import torch

from lctrain.ops.linear_attention_ref import compute_dtype


def gated_delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                               beta: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule by the literal recurrence (one step per token).

    Args:
        q, k: `[b, s, h, dk]` (the model L2-normalises them; the recurrence does not require it).
        v: `[b, s, h, dv]`.
        g: log gate <= 0, `[b, s, h]` or `[h]`; None means a_t = 1.
        beta: `[b, s, h]`, write strengths in [0, 1].
        scale: multiplies the output.
        initial_state: `[b, h, dk, dv]` entering state, or None (zeros).
        output_final_state: also return S_{s-1}.
    Returns:
        `o` `[b, s, h, dv]` in v's dtype; the final state `[b, h, dk, dv]` (float32, float64 for float64
        inputs) or None.
    """
    cdt = compute_dtype(q.dtype)
    b, n, h, dk = q.shape
    if g is None:
        a = torch.ones(b, n, h, dtype=cdt, device=q.device)
    else:
        a = torch.exp(g.to(cdt).expand(b, n, h) if g.dim() == 1 else g.to(cdt))  # [b, n, h]
    qf, kf, vf, bf = (x.to(cdt) for x in (q, k, v, beta))
    state = (initial_state.to(cdt) if initial_state is not None
             else torch.zeros(b, h, dk, v.shape[-1], dtype=cdt, device=q.device))
    outs = []
    for t in range(n):
        state = a[:, t, :, None, None] * state  # [b, h, dk, dv]
        kt = kf[:, t]  # [b, h, dk]
        old = torch.einsum("bhk,bhkv->bhv", kt, state)  # what the state holds along k_t
        state = state + (bf[:, t, :, None] * kt)[..., None] * (vf[:, t] - old)[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    o = torch.stack(outs, dim=1) * scale  # [b, n, h, dv]
    return o.to(v.dtype), (state if output_final_state else None)
