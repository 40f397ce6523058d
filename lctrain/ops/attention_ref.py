"""Plain PyTorch softmax attention returning the log-sum-exp: the definition every backend is tested against.

    s = scale * q k^T (masked),  lse = log sum_j exp(s_j),  p = exp(s - lse),  o = p v

Math runs in float32 (float64 for float64 inputs). Causal masks are aligned bottom-right: with `sq` queries
and `sk` keys, query i sees key j iff j <= i + (sk - sq), i.e. the queries are the last `sq` positions of the
keys (as flash-attn). A query that sees no key gets o = 0 and lse = -inf. GQA: query head i reads kv head
i // (h // h_kv).

The backward takes (o, lse) from outside, so a caller may pass outputs merged over several key blocks
(ring attention): with D = rowsum(do * o) and p = exp(s - lse), ds = p * (do v^T - D),
dq = scale * ds k, dk = scale * ds^T q, dv = p^T do.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention math runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def causal_mask(sq: int, sk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool `[sq, sk]`, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    b, sq, h, d = q.shape
    hk = k.shape[2]
    cdt = compute_dtype(q.dtype)
    qg = q.to(cdt).view(b, sq, hk, h // hk, d)  # [b, sq, hk, g, d]
    s = torch.einsum("bqkgd,bskd->bkgqs", qg, k.to(cdt)) * scale  # [b, hk, g, sq, sk]
    if causal:
        s = s.masked_fill(~causal_mask(sq, k.shape[1], q.device), float("-inf"))
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # Rows with no visible key have lse = -inf and s = -inf everywhere: p must be 0 there, not NaN.
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(s - lse[..., None])


def reference_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                                softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp.

    Args:
        q: `[b, sq, h, d]`.
        k, v: `[b, sk, h_kv, d]` with `h % h_kv == 0`.
        causal: bottom-right aligned causal mask.
        softmax_scale: multiplies q k^T.
    Returns:
        o `[b, sq, h, d]` in q's dtype, lse `[b, h, sq]` in float32 (float64 for float64 inputs).
    """
    return forward_from_scores(_scores(q, k, causal, softmax_scale), q, v)


def forward_from_scores(s: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o and lse from masked scores `s` `[b, hk, g, sq, sk]` (-inf where a key is not visible)."""
    b, sq, h, _ = q.shape
    lse = torch.logsumexp(s, dim=-1)  # [b, hk, g, sq]
    p = _probs(s, lse)
    o = torch.einsum("bkgqs,bskd->bqkgd", p, v.to(s.dtype))  # [b, sq, hk, g, d]
    return o.reshape(b, sq, h, v.shape[-1]).to(q.dtype), lse.reshape(b, h, sq)


def reference_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, causal: bool,
                                 softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`reference_attention_forward` given the (possibly externally merged) o and lse.

    Returns:
        dq `[b, sq, h, d]`, dk and dv `[b, sk, h_kv, d]`, each in its input's dtype.
    """
    return backward_from_scores(do, q, k, v, o, lse, _scores(q, k, causal, softmax_scale), softmax_scale)


def backward_from_scores(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, s: torch.Tensor,
                         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv from the masked scores `s` `[b, hk, g, sq, sk]` and the (possibly merged) o and lse."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    cdt = s.dtype
    p = _probs(s, lse.to(cdt).reshape(b, hk, g, sq))  # [b, hk, g, sq, sk]
    dog = do.to(cdt).view(b, sq, hk, g, -1)  # [b, sq, hk, g, d]
    delta = (do.to(cdt) * o.to(cdt)).sum(-1).view(b, sq, hk, g).permute(0, 2, 3, 1)  # [b, hk, g, sq]
    dv = torch.einsum("bkgqs,bqkgd->bskd", p, dog)
    dp = torch.einsum("bqkgd,bskd->bkgqs", dog, v.to(cdt))
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bkgqs,bskd->bqkgd", ds, k.to(cdt)).reshape(b, sq, h, d) * softmax_scale
    dk = torch.einsum("bkgqs,bqkgd->bskd", ds, q.to(cdt).view(b, sq, hk, g, d)) * softmax_scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
