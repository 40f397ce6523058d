"""Local sliding-window attention (lctrain.ops.attention_window) equals the masked definition: outputs and
gradients in float64, GQA, packed documents, windows 1 / inside / beyond the sequence; the band's (left, right)
form equals the position mask for a chunk against itself and against the halo before it."""
import pytest
import torch

from lctrain.ops.attention_window import band_mask, window_attention, window_mask
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
    assert torch.equal(band_mask(c, c, window - 1, 0, "cpu"), window_mask(q_pos, q_pos, window))
    if h:
        n = min(c, window - 1)
        halo = torch.arange(start - h, start)
        assert torch.equal(band_mask(n, h, window - 1 - n, n, "cpu"), window_mask(q_pos[:n], halo, window))
