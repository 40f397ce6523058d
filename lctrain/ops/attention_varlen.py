"""Softmax attention over packed documents: a query sees only keys of its own document (causal: not later ones).

Several documents are packed into one sequence; `cu_seqlens` (int `[n_docs + 1]`, 0 ... b*s) gives their global
boundaries, with the b sequences of a batch laid end to end (flash-attn's varlen convention; every sequence end
must be a boundary). Tokens carry their position in their sequence and their document id, so any subset of a
packed sequence's queries and keys -- a CP rank's shard, a ring block, a rank-major gather -- is masked exactly:

    mask[b, i, j] = doc_q[b, i] == doc_k[b, j]  and  (not causal or pos_k[j] <= pos_q[i])

Two paths compute the masked attention, with the same results: on CPU PyTorch's fused flash kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`, which takes an additive mask in forward and backward and
reads GQA natively; masked entries get a large finite negative bias, so a row with no visible key stays finite
and is then set to o = 0, lse = -inf), elsewhere the plain PyTorch definition (exact in float64; it
materialises the `[b, h, sq, sk]` scores). `REFERENCE_ONLY = True` forces the definition (tests compare the
two). Like the other backends both return the log-sum-exp, so blocks merge by `merge_attention`, and the
backward accepts an externally merged (o, lse). Document ids come from `torch.searchsorted` on the device: no
host sync. (GPU fast path -- flash-attn's varlen kernels per block -- not written yet.)
"""
from __future__ import annotations

import torch

from lctrain.ops.attention_ref import _scores, backward_from_scores, forward_from_scores


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq_len: int,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """Document index of tokens of a packed batch (a device op, no host sync).

    Args:
        cu_seqlens: int `[n_docs + 1]`, boundaries in the flattened `batch * seq_len` tokens, on q's device.
        batch, seq_len: the packed batch's shape (global sequence length).
        positions: `[n]` positions in the sequence to look up (default: all `seq_len`).
    Returns:
        int64 `[batch, n]`.
    """
    if positions is None:
        positions = torch.arange(seq_len, device=cu_seqlens.device)
    flat = torch.arange(batch, device=positions.device)[:, None] * seq_len + positions[None, :]
    return torch.searchsorted(cu_seqlens, flat.to(cu_seqlens.dtype), right=True) - 1


def document_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor,
                  causal: bool) -> torch.Tensor:
    """Bool `[b, sq, sk]`: query i may see key j (same document; causal: not a later position).

    Args:
        q_pos, k_pos: positions in the sequence, `[sq]`, `[sk]`.
        q_doc, k_doc: document ids, `[b, sq]`, `[b, sk]`.
    """
    mask = q_doc[:, :, None] == k_doc[:, None, :]
    if causal:
        mask = mask & (k_pos[None, None, :] <= q_pos[None, :, None])
    return mask


#: Force the plain PyTorch definition everywhere (tests flip it to compare the fused CPU path against it).
REFERENCE_ONLY = False

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fused(q: torch.Tensor) -> bool:
    return not REFERENCE_ONLY and q.device.type == "cpu" and q.dtype in _CPU_DTYPES


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[b, 1, sq, sk]`: 0 where visible, a large finite negative number elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, -0.5 * torch.finfo(dtype).max)[:, None]


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [b, s, h, d] <-> [b, h, s, d]


def _masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    s = _scores(q, k, False, scale)  # [b, hk, g, sq, sk]
    return s.masked_fill(~mask[:, None, None], float("-inf"))


def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                             softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output `[b, sq, h, d]` (q's dtype) and lse `[b, h, sq]` (float32; float64 for float64) under `mask`.

    Args:
        q: `[b, sq, h, d]`; k, v: `[b, sk, h_kv, d]`, `h % h_kv == 0`.
        mask: bool `[b, sq, sk]` from :func:`document_mask`.
        softmax_scale: multiplies q k^T.
    """
    if _fused(q):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _t(q), _t(k), _t(v), 0.0, False, attn_mask=_bias(mask, q.dtype), scale=softmax_scale)
        seen = mask.any(-1)  # [b, sq]: rows with a visible key (the others got a finite average: zero them)
        o = torch.where(seen[:, :, None, None], _t(o), torch.zeros((), dtype=o.dtype))
        return o, torch.where(seen[:, None, :], lse, torch.full((), float("-inf"), dtype=lse.dtype))
    return forward_from_scores(_masked_scores(q, k, mask, softmax_scale), q, v)


def varlen_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, mask: torch.Tensor,
                              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`varlen_attention_forward` given the (possibly merged over key blocks) o and lse.

    With D = rowsum(do * o), p = exp(s - lse): ds = p * (do v^T - D), dq = scale ds k, dk = scale ds^T q, dv = p^T do.
    """
    if _fused(q):
        # Rows with lse = -inf see no key: any finite lse gives them p = 0 under the bias.
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))
        lse = lse.to(torch.promote_types(q.dtype, torch.float32)).contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _t(do), _t(q), _t(k), _t(v), _t(o), lse, 0.0, False, attn_mask=_bias(mask, q.dtype),
            scale=softmax_scale)
        return _t(dq), _t(dk), _t(dv)
    return backward_from_scores(do, q, k, v, o, lse, _masked_scores(q, k, mask, softmax_scale), softmax_scale)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, q_doc, k_doc, causal, scale):
        o, lse = varlen_attention_forward(q, k, v, document_mask(q_pos, k_pos, q_doc, k_doc, causal), scale)
        # The mask is rebuilt in backward from positions and ids (O(sq + sk)) rather than kept (O(sq * sk)).
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        mask = document_mask(q_pos, k_pos, q_doc, k_doc, ctx.causal)
        return (*varlen_attention_backward(do, q, k, v, o, lse, mask, ctx.scale),) + (None,) * 6


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Differentiable attention within documents (mask of :func:`document_mask`); returns o `[b, sq, h, d]`."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _VarlenAttention.apply(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, scale)


__all__ = ["document_ids", "document_mask", "varlen_attention", "varlen_attention_backward",
           "varlen_attention_forward"]
