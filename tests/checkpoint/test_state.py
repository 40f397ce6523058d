"""Box decomposition of owned ranges: each rank's boxes are views of its own data at the right global place,
and over all TP x ZeRO ranks the boxes tile the global tensor exactly once (what DCP's planner checks)."""
from types import SimpleNamespace

import pytest
import torch

from lctrain.checkpoint.state import Shards, _layout, _row_boxes, owned_boxes


def _param(local_shape, dim, stride):
    p = torch.nn.Parameter(torch.empty(local_shape))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


def _tp_local(full: torch.Tensor, tp: int, rank: int, dim: int, stride: int) -> torch.Tensor:
    """Megatron's strided split: rank r holds pieces r, r + tp, ... of tp * stride pieces along dim."""
    pieces = full.chunk(tp * stride, dim=dim)
    return torch.cat([pieces[j * tp + rank] for j in range(stride)], dim=dim).contiguous()


def test_row_boxes_cover_the_range():
    for cols in (1, 3, 7):
        for cap in (1, 8, 1 << 20):
            for a in range(0, 3 * cols + 1):
                for b in range(a, 3 * cols + 1):
                    boxes = _row_boxes(a, b, cols, cap)
                    flat = sorted(r * cols + c + i * cols + j for r, c, h, w in boxes
                                  for i in range(h) for j in range(w))
                    assert flat == list(range(a, b))
                    assert all(h * w <= max(cap, cols) for _, _, h, w in boxes)
                    assert cap < 1 << 20 or len(boxes) <= 3


@pytest.mark.parametrize("shape,dim,stride,tp,zero", [((12, 10), 0, 1, 2, 3), ((12, 10), 1, 1, 2, 4),
                                                       ((12, 10), 0, 2, 3, 2), ((12, 6), 1, 2, 3, 5),
                                                       ((30,), 0, 1, 3, 4), ((8, 3, 4), 0, 2, 2, 3)])
def test_boxes_tile_the_global_tensor(shape, dim, stride, tp, zero):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    stored = full if full.dim() <= 2 else full.reshape(shape[0], -1)
    hits = torch.zeros_like(stored)
    for r in range(tp):
        local = _tp_local(full, tp, r, dim, stride)
        mesh = SimpleNamespace(tp=tp, tp_rank=r)
        lay = _layout(_param(local.shape, dim, stride), mesh, "w")
        assert lay.global_shape == tuple(stored.shape)
        n = local.numel()
        for z in range(zero):  # an uneven ZeRO split of the local flat tensor
            a, b = n * z // zero, n * (z + 1) // zero
            buf = local.reshape(-1)[a:b].clone()  # a contiguous fragment, as DeepSpeed's
            (boxes,) = owned_boxes(lay, a, b, [buf])
            for off, view in boxes:
                idx = tuple(slice(o, o + s) for o, s in zip(off, view.shape))
                assert torch.equal(stored[idx], view), (r, z, off)
                hits[idx] += 1
                view.add_(0.5)  # views write through to the fragment (what a load relies on)
            assert torch.equal(buf - 0.5, local.reshape(-1)[a:b])
    assert torch.equal(hits, torch.ones_like(hits))


def test_shards_protocol():
    t = torch.arange(12.0).reshape(4, 3)
    s = Shards((8, 3), torch.float32, [((4, 0), t)])
    (item,) = s.__create_write_items__("x", s)
    assert tuple(item.tensor_data.chunk.offsets) == (4, 0) and tuple(item.tensor_data.size) == (8, 3)
    assert s.__get_tensor_shard__(item.index) is t and s.nbytes() == 48
