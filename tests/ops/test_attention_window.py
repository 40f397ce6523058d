"""Local sliding-window attention (lctrain.ops.attention_window) equals the masked definition: outputs and
gradients in float64, GQA, packed documents, windows 1 / inside / beyond the sequence; the band's (left, right)
form equals the position mask for a chunk against itself and against the halo before it."""
import pytest
import torch

from lctrain.ops.attention_window import band_mask, band_window, window_attention, window_mask
from tests.sp.test_halo import masked_window_reference


@pytest.mark.parametrize("window", [1, 4, 40])
@pytest.mark.parametrize("docs", [False, True])
def test_window_attention_matches_definition(window, docs):
    g = torch.Generator().manual_seed(window)
    b, s, h, hk, d = 2, 13, 4, 2, 8
    q = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, s, hk, d, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 4, 13, 20, 26]) if docs else None
    got = [x.clone().requires_grad_(True) for x in (q, k, v)]
    want = [x.clone().requires_grad_(True) for x in (q, k, v)]
    o = window_attention(*got, window, softmax_scale=0.3, cu_seqlens=cu)
    o.backward(do)
    o_ref = masked_window_reference(*want, window, 0.3, cu)
    o_ref.backward(do)
    for a, e in zip([o] + [x.grad for x in got], [o_ref] + [x.grad for x in want]):
        assert (a - e).abs().max() <= 1e-12 * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("window,c,h", [(1, 5, 0), (4, 5, 3), (9, 5, 8), (9, 5, 4), (30, 6, 12)])
def test_band_form_equals_position_mask(window, c, h):
    g = 3  # chunk g starts at position g * c; its halo holds the h positions before it
    start = g * c
    q_pos = torch.arange(start, start + c)
    assert torch.equal(band_mask(c, c, window - 1, 0, "cpu"), window_mask(q_pos, q_pos, window).dense())
    if h:
        n = min(c, window - 1)
        halo = torch.arange(start - h, start)
        assert torch.equal(band_mask(n, h, window - 1 - n, n, "cpu"), window_mask(q_pos[:n], halo, window).dense())


@pytest.mark.parametrize("window", [1, 2, 5, 9, 17])
def test_band_as_causal_window_equals_band_mask(window):
    """The non-flash band path: (left, right) as a causal window W' = left + right + 1 on shifted positions equals
    the band's definition for every (left, right) halo uses: (W - 1, 0) on a chunk, (W - 1 - n, n) on a halo."""
    cases = [(c, c, window - 1, 0) for c in (1, 3, 8, 20)]
    cases += [(n, h, window - 1 - n, n) for n in range(1, window) for h in range(1, 2 * window + 1)]
    for sq, sk, left, right in cases:
        got = band_window(sq, sk, left, right, "cpu")
        assert got.window == left + right + 1
        assert torch.equal(got.dense(), band_mask(sq, sk, left, right, "cpu")), (sq, sk, left, right)
    with pytest.raises(ValueError):
        band_window(2, 4, -1, 0, "cpu")


def test_window_mask_rejects_a_non_causal_or_bad_window():
    from lctrain.ops.attention_varlen import DocumentMask

    pos, ids = torch.arange(4), torch.zeros(1, 4, dtype=torch.int64)
    for causal, window in [(False, 3), (True, 0), (True, True), (True, 2.0)]:
        with pytest.raises(ValueError):
            DocumentMask(pos, pos, ids, ids, causal, None, window)


@pytest.mark.parametrize("packed", [False, True])
def test_window_layer_on_the_gpu_branch_allocates_no_scores(packed):
    """A W layer's local step (halo_attention at CP 1: the band of the chunk, FlexAttention over the window's block
    mask) on meta tensors standing in for GPU ones, forward + backward: no tensor of s * s elements and no score
    matmul; the same call off the GPU branch forms the dense mask (the check can fail)."""
    from lctrain.ops.registry import meta_as_gpu
    from lctrain.sp.halo import halo_attention
    from tests.ops.test_attention_varlen import largest_allocation

    b, s, h, hk, d, window = 2, 4096, 4, 2, 64, 512
    q, k, v = (torch.randn(b, s, n, d, device="meta", requires_grad=True) for n in (h, hk, hk))
    cu = torch.tensor([0, 1000, 4096, 5000, 2 * s], device="meta") if packed else None

    def step(gpu: bool):
        def run():
            if gpu:
                with meta_as_gpu():
                    halo_attention(q, k, v, causal=True, window=window, cu_seqlens=cu).sum().backward()
            else:
                with torch.no_grad():
                    halo_attention(q, k, v, causal=True, window=window, cu_seqlens=cu)
        return largest_allocation(run)

    numel, ops = step(True)
    assert numel < s * s, numel
    assert not any("bmm" in op or "matmul" in op for op in ops), sorted(ops)
    assert step(False)[0] >= s * s


def test_band_block_mask_is_built_once_per_shape():
    """A band's BlockMask depends on its shape only: every layer (and step) reuses one; another band (left, right),
    length or batch gets its own, and the reused one lists the same blocks as a fresh build."""
    from lctrain.ops.attention_varlen import FLEX_BLOCK, cached_block_mask, document_block_mask

    s, w = 3 * FLEX_BLOCK, 100
    first = cached_block_mask(band_window(s, s, w - 1, 0, "cpu").batched(2), s, s)
    assert cached_block_mask(band_window(s, s, w - 1, 0, "cpu").batched(2), s, s) is first
    assert cached_block_mask(band_window(s, s, w - 1, 0, "cpu").batched(1), s, s) is not first
    assert cached_block_mask(band_window(s, s, w - 2, 1, "cpu").batched(2), s, s) is not first
    assert cached_block_mask(band_window(s - 1, s, w - 1, 0, "cpu").batched(2), s - 1, s) is not first
    fresh = document_block_mask(band_window(s, s, w - 1, 0, "cpu").batched(2), s, s)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(first, name), getattr(fresh, name)), name
