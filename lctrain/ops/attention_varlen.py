"""Softmax attention over packed documents: a query sees only keys of its own document (causal: not later ones).

Several documents are packed into one sequence; `cu_seqlens` (int `[n_docs + 1]`, 0 ... b*s) gives their global
boundaries, with the b sequences of a batch laid end to end (flash-attn's varlen convention; every sequence end
must be a boundary). Tokens carry their position in their sequence and their document id, so any subset of a
packed sequence's queries and keys -- a CP rank's shard, a ring block, a rank-major gather -- is masked exactly:

    mask[b, i, j] = doc_q[b, i] == doc_k[b, j]  and  (not causal or pos_k[j] <= pos_q[i])
                    and  (no window or pos_k[j] > pos_q[i] - W)

A sliding window W (causal) is the same mask with the last term; without documents all tokens carry id 0. A
block's mask travels as a :class:`DocumentMask` (positions, ids and the window, O(sq + sk)), or as a dense bool
`[b, sq, sk]`. Three paths compute the masked attention, with the same results:

- GPU (`lctrain.ops.registry.is_gpu_tensor`, so meta tensors under the rehearsal's `meta_as_gpu` too), given a
  DocumentMask: FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a BlockMask built from the
  blocks' document-id and position ranges (`document_block_mask`): blocks of 128 x 128 that no pair can see are
  skipped, blocks inside one document (and below the causal diagonal, and inside the window) run unmasked, only
  boundary blocks call the mask function. No `[sq, sk]` tensor exists: scores stay in the kernel, the block tables are
  `[b, sq/128, sk/128]`. On meta and fake tensors (the rehearsal, the planner) both passes only give shapes
  (plain Python, not custom ops: the backward runs autograd inside, which an op's kernel cannot). The backward
  differentiates a recomputed block forward through autograd with the merge weights of an externally merged
  (o, lse):
  w = exp(lse_block - lse), dL/do_block = w do, dL/dlse_block = w (rowsum(do o_block) - rowsum(do o)).
  flash-attn's varlen functions are not used: a CP block's queries and keys are arbitrary position sets
  (zigzag halves, rank-major gathers), not the contiguous documents its cu_seqlens describe.
- CPU: PyTorch's fused flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, which takes an additive
  mask in forward and backward and reads GQA natively; masked entries get a large finite negative bias, so a row
  with no visible key stays finite and is then set to o = 0, lse = -inf). FlexAttention has no CPU backward.
- Elsewhere the plain PyTorch definition (exact in float64; it materialises the `[b, h, sq, sk]` scores; the CPU
  reference). `REFERENCE_ONLY = True` forces it (tests compare the paths).

All return the log-sum-exp, so blocks merge by `merge_attention`, and the backward accepts an externally merged
(o, lse). Document ids come from `torch.searchsorted` on the device: no host sync.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from lctrain.ops.attention_ref import _scores, backward_from_scores, forward_from_scores
from lctrain.ops.registry import is_gpu_tensor


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
                  causal: bool, window: int | None = None) -> torch.Tensor:
    """Bool `[b, sq, sk]`: query i may see key j (same document; causal: not a later position; window W: not one
    W or more positions back).

    Args:
        q_pos, k_pos: positions in the sequence, `[sq]`, `[sk]` (or per row, `[b, sq]`, `[b, sk]`).
        q_doc, k_doc: document ids, `[b, sq]`, `[b, sk]` (`b` = 1 broadcasts over the batch).
    """
    mask = q_doc[:, :, None] == k_doc[:, None, :]
    if causal:
        mask = mask & (_rows(k_pos)[:, None, :] <= _rows(q_pos)[:, :, None])
    if window is not None:
        mask = mask & (_rows(k_pos)[:, None, :] > _rows(q_pos)[:, :, None] - window)
    return mask


def _rows(pos: torch.Tensor) -> torch.Tensor:
    return pos if pos.dim() == 2 else pos[None]


@dataclass(eq=False)
class DocumentMask:
    """The document mask of one block, kept as the tokens' positions and document ids (O(sq + sk) memory)."""

    q_pos: torch.Tensor
    """int `[sq]` or `[b, sq]`: the queries' positions in the sequence."""
    k_pos: torch.Tensor
    """int `[sk]` or `[b, sk]`: the keys' positions."""
    q_doc: torch.Tensor
    """int64 `[b, sq]`: the queries' document ids (`b` = 1: the same for every batch row)."""
    k_doc: torch.Tensor
    """int64 `[b, sk]`: the keys' document ids."""
    causal: bool
    """Whether a query sees only keys at positions <= its own."""
    batch_key: tuple | None = None
    """(the batch's document object, this block's name): the GPU branch builds the block's BlockMask once per batch
    and every layer reuses it (None: built per call)."""
    window: int | None = None
    """Sliding window W (causal only): a query at position p sees keys at positions p - W < j <= p."""

    def __post_init__(self):
        if self.window is not None and (not self.causal or isinstance(self.window, bool)
                                        or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"a DocumentMask window must be a positive int with causal=True, got {self.window!r}")

    def dense(self) -> torch.Tensor:
        """Bool `[b, sq, sk]` (:func:`document_mask`): for the CPU and reference paths only."""
        return document_mask(self.q_pos, self.k_pos, self.q_doc, self.k_doc, self.causal, self.window)

    def batched(self, batch: int) -> "DocumentMask":
        """This mask with ids of one row broadcast to `batch` rows (views, no copy); itself when nothing to do."""
        if self.q_doc.shape[0] == batch and self.k_doc.shape[0] == batch:
            return self
        return DocumentMask(self.q_pos, self.k_pos, self.q_doc.expand(batch, -1), self.k_doc.expand(batch, -1),
                            self.causal, self.batch_key, self.window)

    @staticmethod
    def cat(masks: list["DocumentMask"]) -> "DocumentMask":
        """Blocks stacked along the batch (as `torch.cat(..., dim=0)` of their dense masks)."""
        def rows(pos, doc):
            return _rows(pos).expand(doc.shape[0], -1)
        keys = [m.batch_key for m in masks]
        key = None if None in keys else (keys[0][0], ("cat", *(k[1] for k in keys)))
        return DocumentMask(torch.cat([rows(m.q_pos, m.q_doc) for m in masks]),
                            torch.cat([rows(m.k_pos, m.k_doc) for m in masks]),
                            torch.cat([m.q_doc for m in masks]), torch.cat([m.k_doc for m in masks]),
                            masks[0].causal, key, masks[0].window)


#: FlexAttention's block size (queries and keys) for document block masks.
FLEX_BLOCK = 128


def _blocks(x: torch.Tensor, fill: int, n: int) -> torch.Tensor:
    """`[b, s]` padded with `fill` to `n * FLEX_BLOCK` tokens, as `[b, n, FLEX_BLOCK]`."""
    pad = n * FLEX_BLOCK - x.shape[1]
    return torch.nn.functional.pad(x, (0, pad), value=fill).view(x.shape[0], n, FLEX_BLOCK)


def _ordered(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count `[b, 1, nq]` int32, block indices `[b, 1, nq, nk]` int32, the visible ones first) of a bool table."""
    order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True)
    return visible.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]


def document_block_mask(mask: DocumentMask, sq: int, sk: int):
    """FlexAttention BlockMask of a DocumentMask, from per-block ranges of document ids and positions.

    A (query block, key block) pair is skipped unless their document-id ranges overlap (and, causal, some key
    position is <= some query position; window W, some key position is > some query position - W); it runs
    without calling the mask function when both blocks lie in one and the same document (and, causal, every key
    position is <= every query position; window, every key position is > every query position - W). Ids within a
    block form a contiguous range (documents are contiguous in the sequence), so overlapping ranges share a document.
    Tables are `[b, ceil(sq/128), ceil(sk/128)]`; device ops only (no host sync).
    """
    from torch.nn.attention.flex_attention import BlockMask

    b = mask.q_doc.shape[0]
    nq, nk = -(-sq // FLEX_BLOCK), -(-sk // FLEX_BLOCK)
    big = torch.iinfo(torch.int64).max // 4
    qd, kd = mask.q_doc.to(torch.int64), mask.k_doc.to(torch.int64)
    qp, kp = (_rows(p).to(torch.int64).expand(b, -1) for p in (mask.q_pos, mask.k_pos))
    # Padding tokens: ids -1 (queries) and -2 (keys), never equal; padded positions never visible.
    qd_pad, kd_pad = _blocks(qd, -1, nq), _blocks(kd, -2, nk)
    q_lo, q_hi = _blocks(qd, big, nq).amin(-1), _blocks(qd, -big, nq).amax(-1)  # [b, nq], real tokens only
    k_lo, k_hi = _blocks(kd, big, nk).amin(-1), _blocks(kd, -big, nk).amax(-1)
    any_pair = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    q_one = (q_lo == q_hi) & (qd_pad.amin(-1) >= 0)  # [b, nq]: one document, no padding
    k_one = (k_lo == k_hi) & (kd_pad.amin(-1) >= 0)
    one_doc = q_one[:, :, None] & k_one[:, None, :]
    full = one_doc & (q_lo[:, :, None] == k_lo[:, None, :])
    if mask.causal:
        qp_hi, qp_lo = _blocks(qp, -big, nq).amax(-1), _blocks(qp, big, nq).amin(-1)
        kp_lo, kp_hi = _blocks(kp, big, nk).amin(-1), _blocks(kp, -big, nk).amax(-1)
        any_pair = any_pair & (kp_lo[:, None, :] <= qp_hi[:, :, None])
        full = full & (kp_hi[:, None, :] <= qp_lo[:, :, None])
        if mask.window is not None:
            any_pair = any_pair & (kp_hi[:, None, :] > qp_lo[:, :, None] - mask.window)
            full = full & (kp_lo[:, None, :] > qp_hi[:, :, None] - mask.window)
    partial = any_pair & ~full
    qd_flat, kd_flat = qd_pad.flatten(1), kd_pad.flatten(1)  # [b, nq*128], [b, nk*128]
    qp_flat, kp_flat = _blocks(qp, 0, nq).flatten(1), _blocks(kp, 0, nk).flatten(1)
    causal, window = mask.causal, mask.window

    def mask_mod(bi, hi, qi, ki):
        ok = qd_flat[bi, qi] == kd_flat[bi, ki]
        if causal:
            ok = ok & (kp_flat[bi, ki] <= qp_flat[bi, qi])
        if window is not None:
            ok = ok & (kp_flat[bi, ki] > qp_flat[bi, qi] - window)
        return ok

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(sq, sk))


@functools.lru_cache(maxsize=1)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materialises the scores; compiled, it runs the fused kernel over the block mask.
    return torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention


#: BlockMasks by batch (the document object, weakly held: freed with the batch) and block name.
_BLOCK_MASKS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def cached_block_mask(mask: DocumentMask, sq: int, sk: int):
    """:func:`document_block_mask`, built once per batch and block when the mask names them (`batch_key`)."""
    if mask.batch_key is None:
        return document_block_mask(mask, sq, sk)
    owner, name = mask.batch_key
    table = _BLOCK_MASKS.setdefault(owner, {})
    key = (name, sq, sk, mask.q_doc.shape[0], mask.causal, mask.window)
    if key not in table:
        table[key] = document_block_mask(mask, sq, sk)
    return table[key]


def _flex_attention(q, k, v, mask: DocumentMask, scale: float):
    """(o `[b, sq, h, d]`, lse `[b, h, sq]`) of FlexAttention over `mask`'s block mask, differentiable."""
    block_mask = cached_block_mask(mask, q.shape[1], k.shape[1])
    o, lse = _flex()(_t(q), _t(k), _t(v), block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
                     return_lse=True)
    return _t(o), lse


def backward_by_recompute(forward, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block given the merged (o, lse), by autograd through a recomputed block forward.

    `forward(q, k, v) -> (o_b, lse_b)` must be differentiable in o_b and lse_b. With the merge
    o = sum_b w_b o_b, w_b = exp(lse_b - lse): dL/do_b = w_b do and dL/dlse_b = w_b (rowsum(do o_b) - rowsum(do o)).
    """
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        o_b, lse_b = forward(*leaves)
        cdt = lse_b.dtype
        w = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - lse.to(cdt)), torch.zeros((), dtype=cdt))  # [b,h,sq]
        w_rows = _t(w)[..., None]  # [b, sq, h, 1]
        dot = lambda x: _t((do.to(cdt) * x.detach().to(cdt)).sum(-1))  # noqa: E731 - [b, h, sq]
        d_lse = w * (dot(o_b) - dot(o))
        grads = torch.autograd.grad((o_b, lse_b), leaves, ((do.to(cdt) * w_rows).to(o_b.dtype), d_lse))
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


def _shape_only(x: torch.Tensor) -> bool:
    """Meta or fake tensors (the rehearsal, the planner): only shapes exist, no kernel runs."""
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "meta" or is_fake(x)


def _gpu_forward(q, k, v, mask: DocumentMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _shape_only(q):
        b, sq, h, _ = q.shape
        return (q.new_empty(b, sq, h, v.shape[-1]),
                q.new_empty(b, h, sq, dtype=torch.promote_types(q.dtype, torch.float32)))
    with torch.no_grad():
        return _flex_attention(q, k, v, mask, scale)


def _gpu_backward(do, q, k, v, o, lse, mask: DocumentMask, scale: float):
    if _shape_only(q):
        # What the real backward holds besides its results: the recomputed block output and lse.
        transient = (torch.empty_like(o), torch.empty_like(lse))  # noqa: F841 - counted while alive
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    return backward_by_recompute(lambda q, k, v: _flex_attention(q, k, v, mask, scale), do, q, k, v, o, lse)




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
        mask: a :class:`DocumentMask` (the GPU path never forms `[sq, sk]`), or a bool `[b, sq, sk]` (`b` = 1
            broadcasts over the batch: the CPU paths keep a one-row mask at one row).
        softmax_scale: multiplies q k^T.
    """
    if isinstance(mask, DocumentMask):
        if is_gpu_tensor(q) and not REFERENCE_ONLY:
            return _gpu_forward(q, k, v, mask.batched(q.shape[0]), softmax_scale)
        mask = mask.dense()
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
    if isinstance(mask, DocumentMask):
        if is_gpu_tensor(q) and not REFERENCE_ONLY:
            return _gpu_backward(do, q, k, v, o, lse, mask.batched(q.shape[0]), softmax_scale)
        mask = mask.dense()
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
        o, lse = varlen_attention_forward(q, k, v, DocumentMask(q_pos, k_pos, q_doc, k_doc, causal), scale)
        # The mask is rebuilt in backward from positions and ids (O(sq + sk)) rather than kept (O(sq * sk)).
        ctx.save_for_backward(q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_pos, k_pos, q_doc, k_doc = ctx.saved_tensors
        mask = DocumentMask(q_pos, k_pos, q_doc, k_doc, ctx.causal)
        return (*varlen_attention_backward(do, q, k, v, o, lse, mask, ctx.scale),) + (None,) * 6


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool = True,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Differentiable attention within documents (mask of :func:`document_mask`); returns o `[b, sq, h, d]`."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _VarlenAttention.apply(q, k, v, q_pos, k_pos, q_doc, k_doc, causal, scale)


__all__ = ["DocumentMask", "backward_by_recompute", "cached_block_mask", "document_block_mask", "document_ids",
           "document_mask", "varlen_attention", "varlen_attention_backward", "varlen_attention_forward"]
