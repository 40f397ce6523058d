"""Sliding-window softmax attention: query at position i sees keys at positions j with i - W < j <= i.

Two entry points, both returning the log-sum-exp so blocks merge by `merge_attention` like every other local op:

- :func:`band_attention_forward` / :func:`band_attention_backward`: queries and keys are contiguous runs of
  positions, query i placed at key index i + sk - sq (bottom-right aligned, as flash-attn), seeing key indices
  [i + sk - sq - left, i + sk - sq + right]: a chunk against itself is (left, right) = (W - 1, 0); its first n
  queries against the H keys before it (a halo) are (W - 1 - n, n). On CUDA with flash-attn installed this is
  flash-attn with `window_size=(left, right)`; otherwise the band is a causal window W' = left + right + 1 on
  positions q_pos = arange(sk - sq, sk) + right, k_pos = arange(sk) (query i sees q_pos - W' < j <= q_pos), run
  as below.
- :func:`window_attention_forward` / :func:`window_attention_backward`: any query and key positions (the blocks
  of ring / all-gather / a halo, zigzag bounding boxes), optionally within documents: the mask

      mask[b, i, j] = pos_k[j] <= pos_q[i]  and  pos_k[j] > pos_q[i] - W  and  (same document)

  kept as a `DocumentMask` with `window=W` (positions and ids, O(sq + sk); one id 0 without documents) and run by
  `lctrain.ops.attention_varlen`: FlexAttention over a block mask that skips blocks outside the window on the
  GPU branch (no `[sq, sk]` tensor), PyTorch's fused CPU kernel with an additive mask, or the plain masked
  definition (exact in float64).

`window_attention` is the differentiable single-process form (the reference of the CP methods and the local
compute of a window layer at CP 1). A window >= the sequence is plain causal attention.
"""
from __future__ import annotations

import torch

from lctrain.ops import attention_flash_attn
from lctrain.ops.attention_varlen import (DocumentMask, document_ids, varlen_attention_backward,
                                          varlen_attention_forward)


def check_window(window: int) -> None:
    """A ValueError unless `window` is a positive int (W = 1: each query sees only itself)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (query i sees keys i - W < j <= i), got {window!r}")


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, q_doc: torch.Tensor | None = None,
                k_doc: torch.Tensor | None = None, batch_key: tuple | None = None) -> DocumentMask:
    """The window (and document) mask of query positions `[sq]` against key positions `[sk]`, O(sq + sk):
    key j visible to query i iff pos_q[i] - W < pos_k[j] <= pos_q[i] (and same document). Without documents every
    token carries id 0 (`[1, s]`, broadcast over the batch); `.dense()` gives the bool `[b, sq, sk]`."""
    if q_doc is None:
        q_doc = torch.zeros(1, q_pos.shape[-1], dtype=torch.int64, device=q_pos.device)
        k_doc = torch.zeros(1, k_pos.shape[-1], dtype=torch.int64, device=k_pos.device)
    return DocumentMask(q_pos, k_pos, q_doc, k_doc, True, batch_key, window)


def window_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask,
                             softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o `[b, sq, h, d]` and lse `[b, h, sq]` under a :func:`window_mask` (ids of one row broadcast over the batch)."""
    return varlen_attention_forward(q, k, v, mask, softmax_scale)


def window_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, mask: DocumentMask,
                              softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`window_attention_forward` for the given (possibly merged) o and lse."""
    return varlen_attention_backward(do, q, k, v, o, lse, mask, softmax_scale)


def _flash_band(q: torch.Tensor, k: torch.Tensor) -> bool:
    return attention_flash_attn.available() and attention_flash_attn.supports(q, k, k, True)


def _flash_args(left: int, right: int, scale: float) -> dict:
    args = attention_flash_attn._common(False, scale)
    args.update(window_size=(left, right), window_size_left=left, window_size_right=right)
    return args


def band_mask(sq: int, sk: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """Bool `[1, sq, sk]`: key index j visible to query i iff i + sk - sq - left <= j <= i + sk - sq + right (the
    definition; tests compare :func:`band_window` against it)."""
    # rel[i, j] = j - (i + sk - sq)
    rel = torch.arange(sk, device=device)[None, :] - torch.arange(sk - sq, sk, device=device)[:, None]
    return ((rel >= -left) & (rel <= right))[None]


class _Bands:
    """Owns the bands' FlexAttention BlockMasks for the process (a band's mask depends on its shape only, so every
    layer and step reuses one per shape; `lctrain.ops.attention_varlen.cached_block_mask`)."""


_BANDS = _Bands()


def band_window(sq: int, sk: int, left: int, right: int, device: torch.device) -> DocumentMask:
    """The band (left, right) as a causal window W' = left + right + 1 on q_pos = arange(sk - sq, sk) + right,
    k_pos = arange(sk): q_pos - W' < j <= q_pos  <=>  i + sk - sq - left <= j <= i + sk - sq + right."""
    if left < 0 or right < 0:
        raise ValueError(f"band (left, right) must be non-negative, got ({left}, {right})")
    q_pos = torch.arange(sk - sq + right, sk + right, device=device)
    return window_mask(q_pos, torch.arange(sk, device=device), left + right + 1,
                       batch_key=(_BANDS, ("band", left, right, str(torch.device(device)))))


def band_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int,
                           softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query i to key indices [i + sk - sq - left, i + sk - sq + right] (module docstring).

    Returns o `[b, sq, h, d]` and lse `[b, h, sq]` (float32; float64 for float64 inputs).
    """
    if _flash_band(q, k):
        fa = attention_flash_attn._interface()
        res = attention_flash_attn._call(fa._flash_attn_forward,
                                         dict(q=q, k=k, v=v, **_flash_args(left, right, softmax_scale)))
        o, lse = (res[0], res[5]) if len(res) == 8 else (res[0], res[1])
        return o, lse[..., : q.shape[1]]
    return window_attention_forward(q, k, v, band_window(q.shape[1], k.shape[1], left, right, q.device),
                                    softmax_scale)


def band_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, left: int, right: int,
                            softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of :func:`band_attention_forward` for the given (possibly merged) o and lse."""
    if _flash_band(q, k):
        fa = attention_flash_attn._interface()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        attention_flash_attn._call(fa._flash_attn_backward, dict(
            dout=do.contiguous(), q=q, k=k, v=v, out=o.contiguous(), softmax_lse=lse.float().contiguous(),
            dq=dq, dk=dk, dv=dv, **_flash_args(left, right, softmax_scale)))
        return dq, dk, dv
    return window_attention_backward(do, q, k, v, o, lse, band_window(q.shape[1], k.shape[1], left, right, q.device),
                                     softmax_scale)


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, cu_seqlens):
        b, s = q.shape[:2]
        if cu_seqlens is None:
            o, lse = band_attention_forward(q, k, v, window - 1, 0, scale)
        else:
            o, lse = window_attention_forward(q, k, v, _packed_mask(cu_seqlens, b, s, window), scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        b, s = q.shape[:2]
        if cu_seqlens is None:
            grads = band_attention_backward(do, q, k, v, o, lse, ctx.window - 1, 0, ctx.scale)
        else:
            grads = window_attention_backward(do, q, k, v, o, lse, _packed_mask(cu_seqlens, b, s, ctx.window),
                                              ctx.scale)
        return (*grads, None, None, None)


def _packed_mask(cu_seqlens: torch.Tensor, b: int, s: int, window: int) -> DocumentMask:
    pos = torch.arange(s, device=cu_seqlens.device)
    doc = document_ids(cu_seqlens, b, s, pos)
    return window_mask(pos, pos, window, doc, doc)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                     softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable causal sliding-window attention on one process.

    Args:
        q: `[b, s, h, d]`; k, v: `[b, s, h_kv, d]`, `h % h_kv == 0`.
        window: W >= 1; query i sees keys i - W < j <= i.
        softmax_scale: default 1/sqrt(d).
        cu_seqlens: packed documents (int `[n_docs + 1]`, boundaries of the `b * s` tokens laid end to end).
    Returns:
        o `[b, s, h, d]`.
    """
    check_window(window)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _WindowAttention.apply(q, k, v, window, scale, cu_seqlens)


__all__ = ["band_attention_backward", "band_attention_forward", "band_mask", "band_window", "check_window",
           "window_attention", "window_attention_backward", "window_attention_forward", "window_mask"]
