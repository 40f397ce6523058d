"""What a linear-attention SP layer keeps for backward (issue 21's ratios at small shapes, bf16, d = 128).

Saved bytes per layer are counted by saved-tensor hooks (`track_saved_tensors`, the layer's own q, k, v included)
and by walking the autograd graph (`graph_saved_bytes`); both must agree, so nothing hides under inner hooks.
One process stands in for a rank of a CP group of 2 or 16 (torch's "fake" process group: collectives return
at once, shapes and saved tensors are what a real rank has).

- LASP-2 (the chunk backend) keeps at most 1.5x what LASP-1 keeps (it keeps the same: q, k, v, decay and its
  own entering states; before issue 21 it kept 8.5x, the intra-chunk graph);
- gated LASP-2 (scalar gate, GLA's vector gate, the gated delta rule) at most 2x plain LASP-2;
- none of them grows with the CP size (no gathered states are pinned for backward).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lctrain.sp import lasp1_linear_attention, lasp2_delta_attention, lasp2_linear_attention
from lctrain.testing.hot_path import graph_saved_bytes, track_saved_tensors

B, S_LOCAL, H, D = 1, 256, 2, 128


@pytest.fixture(scope="module")
def groups():
    """A fake world of 16 ranks (this process is rank 1) and its sub-group of ranks 0 and 1."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=16)
    try:
        yield {2: dist.new_group([0, 1]), 16: dist.group.WORLD}
    finally:
        dist.destroy_process_group()


def _inputs(gate: str | None):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S_LOCAL, H, D, generator=gen).to(torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    extra = {}
    if gate == "head":
        extra["log_decay"] = -torch.rand(H, generator=gen)
    elif gate == "scalar":
        extra["log_decay"] = -torch.rand(B, S_LOCAL, H, generator=gen).requires_grad_(True)
    elif gate == "vector":
        extra["log_decay"] = -torch.rand(B, S_LOCAL, H, D, generator=gen).requires_grad_(True)
    elif gate == "delta":
        extra["log_decay"] = -torch.rand(B, S_LOCAL, H, generator=gen).requires_grad_(True)
        extra["beta"] = torch.rand(B, S_LOCAL, H, generator=gen).to(torch.bfloat16).requires_grad_(True)
    return q, k, v, extra


def saved_bytes(method: str, group, gate: str | None = None, layout: str = "contiguous") -> int:
    q, k, v, extra = _inputs(gate)
    with track_saved_tensors() as rec:
        if method == "lasp1":
            o = lasp1_linear_attention(q, k, v, extra.get("log_decay"), group=group)
        elif gate == "delta":
            o = lasp2_delta_attention(q, k, v, extra["beta"], extra["log_decay"], group=group, layout=layout)
        else:
            o = lasp2_linear_attention(q, k, v, extra.get("log_decay"), group=group, layout=layout)
    walked = graph_saved_bytes(o)
    assert walked == rec.bytes, (method, gate, walked, rec.bytes)  # nothing hidden from the hooks
    o.float().sum().backward()  # the graph is usable (and frees what it kept)
    return rec.bytes


def test_lasp2_keeps_what_lasp1_keeps(groups):
    qkv, state = 3 * B * S_LOCAL * H * D * 2, B * H * D * D * 4
    for gate in (None, "head"):
        lasp1 = saved_bytes("lasp1", groups[16], gate)
        decay = H * 4 if gate else 0
        assert lasp1 == qkv + state + decay, (gate, lasp1, qkv, state)  # q, k, v, decay, the entering state
        for layout in ("contiguous", "zigzag"):
            lasp2 = saved_bytes("lasp2", groups[16], gate, layout)
            assert lasp2 <= 1.5 * lasp1, (gate, layout, lasp2 / lasp1)


def test_gated_lasp2_keeps_at_most_twice_plain_lasp2(groups):
    plain = saved_bytes("lasp2", groups[16])
    for gate in ("scalar", "vector", "delta"):
        for layout in ("contiguous", "zigzag"):
            gated = saved_bytes("lasp2", groups[16], gate, layout)
            assert gated <= 2 * plain, (gate, layout, gated / plain)


def test_saved_bytes_do_not_grow_with_the_cp_size(groups):
    for gate in (None, "head", "scalar", "vector", "delta"):
        for layout in ("contiguous", "zigzag"):
            small, large = (saved_bytes("lasp2", groups[p], gate, layout) for p in (2, 16))
            assert small == large, (gate, layout, small, large)
