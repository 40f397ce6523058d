"""The GPU branch of document-masked softmax attention (lctrain.ops.attention_varlen): FlexAttention block masks
built from document ranges, the backward from a merged (o, lse), and no `[sq, sk]` storage on the GPU branch.

FlexAttention runs forward on CPU (eager) but has no CPU backward; the backward's math is checked with the plain
definition as the recomputed block forward, and the GPU branch's memory on meta tensors through the registry seam.
"""
from __future__ import annotations

import pytest
import torch

from lctrain.ops.attention_merge import merge_attention
from lctrain.ops.attention_ref import reference_attention_backward
from lctrain.ops.attention_varlen import (FLEX_BLOCK, DocumentMask, _flex_attention, backward_by_recompute,
                                          document_block_mask, document_ids, varlen_attention,
                                          varlen_attention_forward)
from lctrain.ops.registry import meta_as_gpu


def _case(seed: int, b: int, s: int, causal: bool, zigzag: bool, window: int | None = None, docs: bool = True):
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, b * s, (6,), generator=gen).tolist()) | {s * i for i in range(1, b)})
    cu = torch.tensor([0, *cuts, b * s])
    pos = torch.arange(s)
    if zigzag:  # a CP rank's two halves, as in the zigzag layout
        pos = torch.cat([pos[: s // 4], pos[-s // 4:]])
    k_pos = torch.arange(s)
    if not docs:  # one id for every token, broadcast over the batch (as a window without documents)
        return DocumentMask(pos, k_pos, torch.zeros(1, len(pos), dtype=torch.int64),
                            torch.zeros(1, s, dtype=torch.int64), causal, None, window).batched(b)
    return DocumentMask(pos, k_pos, document_ids(cu, b, s, pos), document_ids(cu, b, s, k_pos), causal, None, window)


def _tables(bm, name: str) -> torch.Tensor:
    """Bool `[b, nq, nk]`: the blocks a BlockMask lists in its partial ("kv") or "full_kv" tables."""
    num, idx = getattr(bm, f"{name}_num_blocks"), getattr(bm, f"{name}_indices")
    b, _, nq, nk = idx.shape
    out = torch.zeros(b, nq, nk, dtype=torch.bool)
    for i in range(b):
        for r in range(nq):
            out[i, r, idx[i, 0, r, : num[i, 0, r]].long()] = True
    return out


@pytest.mark.parametrize("causal,zigzag,window,docs", [
    (True, False, None, True), (True, True, None, True), (False, False, None, True),
    (True, False, 1, True), (True, False, 200, True), (True, True, 200, True), (True, False, 300, False),
    (True, True, 130, False)])
def test_block_mask_runs_every_visible_pair_and_skips_the_rest(causal, zigzag, window, docs):
    b, s = 2, 5 * FLEX_BLOCK + 17  # not a multiple of the block
    mask = _case(int(torch.randint(0, 2**31, ()).item()), b, s, causal, zigzag, window, docs)
    sq, sk = mask.q_pos.shape[0], mask.k_pos.shape[0]
    dense = mask.dense()  # [b, sq, sk]
    bm = document_block_mask(mask, sq, sk)
    partial, full = _tables(bm, "kv"), _tables(bm, "full_kv")
    nq, nk = partial.shape[1:]
    padded = torch.zeros(b, nq * FLEX_BLOCK, nk * FLEX_BLOCK, dtype=torch.bool)
    padded[:, :sq, :sk] = dense
    blocks = padded.view(b, nq, FLEX_BLOCK, nk, FLEX_BLOCK)
    seen = blocks.any(4).any(2)  # [b, nq, nk]: blocks with a visible pair
    assert not (partial & full).any()
    assert torch.equal(seen & ~(partial | full), torch.zeros_like(seen))  # nothing visible is skipped
    for i, r, c in full.nonzero().tolist():  # a full block: every real pair visible
        real = padded[i, r * FLEX_BLOCK:(r + 1) * FLEX_BLOCK, c * FLEX_BLOCK:(c + 1) * FLEX_BLOCK]
        rq, rk = min(FLEX_BLOCK, sq - r * FLEX_BLOCK), min(FLEX_BLOCK, sk - c * FLEX_BLOCK)
        assert real[:rq, :rk].all()
    if not zigzag:  # contiguous positions: exactly the blocks with a visible pair run
        assert torch.equal(partial | full, seen)
    assert (partial | full).sum() < partial.numel()  # something was skipped
    if window is not None:
        # No listed block lies wholly outside the window: each has a key position > a query position - W.
        q_blk = torch.nn.functional.pad(mask.q_pos, (0, nq * FLEX_BLOCK - sq), value=-10**9).view(nq, FLEX_BLOCK)
        k_blk = torch.nn.functional.pad(mask.k_pos, (0, nk * FLEX_BLOCK - sk), value=-10**9).view(nk, FLEX_BLOCK)
        q_lo = torch.where(q_blk < 0, 10**9, q_blk).amin(-1)
        in_window = k_blk.amax(-1)[None, :] > q_lo[:, None] - window  # [nq, nk]
        assert not ((partial | full) & ~in_window).any()
        k_lo = torch.where(k_blk < 0, 10**9, k_blk).amin(-1)
        below_diagonal = k_lo[None, :] <= q_blk.amax(-1)[:, None]
        assert (below_diagonal & ~in_window).any()  # the case has blocks that only the window prunes


def _definition(q, k, v, mask: DocumentMask, scale):
    """Differentiable plain definition (o, lse) under a document mask."""
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, 2)) * scale
    s = s.masked_fill(~mask.dense()[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, v.repeat_interleave(g, 2)), lse


@pytest.mark.parametrize("window", [None, 150])
def test_flex_forward_matches_the_definition(window):
    """FlexAttention (CPU eager) with the document block mask, float64, GQA, a row that sees no key; with a
    sliding window too (the block mask's mask_mod applies it inside partial blocks)."""
    b, s, h, hk, d = 2, 2 * FLEX_BLOCK + 9, 4, 2, 16
    mask = _case(int(torch.randint(0, 2**31, ()).item()), b, s, True, True, window)
    mask.k_doc[0, :] += 1000  # row 0: no query of batch row 0 sees a key
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, mask.q_pos.shape[0], h, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, s, hk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    o, lse = _flex_attention(q, k, v, mask, 0.3)
    o_ref, lse_ref = _definition(q, k, v, mask, 0.3)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and torch.isinf(lse[0]).all()
    fin = torch.isfinite(lse_ref)
    assert torch.allclose(lse[fin], lse_ref[fin], rtol=0, atol=1e-12)
    assert torch.allclose(o, o_ref, rtol=0, atol=1e-12) and o[0].abs().max() == 0


def test_backward_by_recompute_from_a_merged_lse():
    """Two key blocks merged by log-sum-exp; each block's backward from the merged (o, lse) sums to the gradient
    of attention over all keys (float64)."""
    b, sq, sk, h, hk, d = 2, 9, 14, 4, 2, 8
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    q, do = (torch.randn(b, sq, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, sk, hk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 4, 11, 14, 20, 28])
    q_pos, k_pos = torch.arange(5, 14), torch.arange(14)
    full = DocumentMask(q_pos, k_pos, document_ids(cu, b, 14, q_pos), document_ids(cu, b, 14, k_pos), True)
    halves = [DocumentMask(q_pos, k_pos[sl], full.q_doc, full.k_doc[:, sl], True) for sl in (slice(0, 6), slice(6, 14))]
    parts = [_definition(q, k[:, sl], v[:, sl], m, 0.4) for m, sl in zip(halves, (slice(0, 6), slice(6, 14)))]
    o, lse = parts[0][0].clone(), parts[0][1].clone()
    merge_attention(o, lse, *parts[1])
    grads = [backward_by_recompute(lambda q_, k_, v_, m=m: _definition(q_, k_, v_, m, 0.4), do, q, k[:, sl],
                                   v[:, sl], o, lse) for m, sl in zip(halves, (slice(0, 6), slice(6, 14)))]
    dq = grads[0][0] + grads[1][0]
    dk, dv = torch.cat([grads[0][1], grads[1][1]], 1), torch.cat([grads[0][2], grads[1][2]], 1)
    # The reference: the same attention over all keys, differentiated by autograd.
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o_all, _ = _definition(*leaves, full, 0.4)
    assert torch.allclose(o_all, o, atol=1e-12)
    ref = torch.autograd.grad(o_all, leaves, do)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-11), (name, (got - want).abs().max())


def largest_allocation(run) -> tuple[int, set[str]]:
    """(the most elements of any tensor an op returns, the ops called) while `run()` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = {"numel": 0, "ops": set()}

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen["ops"].add(str(func))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    seen["numel"] = max(seen["numel"], t.numel())
            return out

    with Largest():
        run()
    return seen["numel"], seen["ops"]


def test_gpu_branch_allocates_no_scores():
    """On meta tensors standing in for GPU ones, a document-masked forward + backward creates no tensor of
    sq * sk elements (the CPU/reference paths do: the test fails if the GPU branch is bypassed)."""
    b, s, h, hk, d = 1, 4096, 4, 2, 64
    q, k, v = (torch.randn(b, s, n, d, device="meta", requires_grad=True) for n in (h, hk, hk))
    pos = torch.arange(s, device="meta")
    docs = torch.zeros(b, s, dtype=torch.int64, device="meta")

    def gpu():
        with meta_as_gpu():
            varlen_attention(q, k, v, pos, pos, docs, docs, True, 0.125).sum().backward()

    numel, ops = largest_allocation(gpu)
    assert numel < s * s, numel
    assert not any("bmm" in op or "matmul" in op for op in ops), ops  # no score products
    numel, _ = largest_allocation(lambda: varlen_attention_forward(q.detach(), k.detach(), v.detach(),
                                                                   DocumentMask(pos, pos, docs, docs, True), 0.125))
    assert numel >= s * s  # the reference path forms the scores: the check can fail


def test_block_mask_is_built_once_per_batch_and_block():
    """Masks naming the same batch and block share one BlockMask (every layer reuses it); another block or another
    batch gets its own; the cache lets go of a batch with its document object."""
    import gc

    from lctrain.ops.attention_varlen import _BLOCK_MASKS, cached_block_mask

    class Batch:  # stands in for the batch's PackedDocuments
        pass

    batch = Batch()
    base = _case(0, 1, 2 * FLEX_BLOCK, True, False)

    def named(owner, name):
        return DocumentMask(base.q_pos, base.k_pos, base.q_doc.clone(), base.k_doc.clone(), True, (owner, name))

    sq, sk = base.q_pos.shape[0], base.k_pos.shape[0]
    first = cached_block_mask(named(batch, "blk"), sq, sk)
    assert cached_block_mask(named(batch, "blk"), sq, sk) is first  # the next layer
    assert cached_block_mask(named(batch, "other"), sq, sk) is not first
    assert cached_block_mask(named(Batch(), "blk"), sq, sk) is not first
    assert cached_block_mask(base, sq, sk) is not first  # unnamed: built per call
    assert batch in _BLOCK_MASKS
    del batch, first
    gc.collect()
    assert not any(isinstance(owner, Batch) for owner in _BLOCK_MASKS.keys())
