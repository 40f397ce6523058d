"""split_tp gives rank r the pieces r, r + tp, ... of the full tensor (Megatron's strided TP partitioning)."""
from types import SimpleNamespace

import torch

from lctrain.checkpoint.state import split_tp


def _param(shape, dim, stride):
    p = torch.nn.Parameter(torch.empty(shape))
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


def test_split_inverts_megatron_strided_layout():
    full = torch.randn(12, 6)
    for dim, stride in ((0, 1), (1, 1), (0, 2)):
        tp = 2 if dim == 1 else 3 if stride == 1 else 2
        pieces = full.chunk(tp * stride, dim=dim)
        for r in range(tp):
            mesh = SimpleNamespace(tp=tp, tp_rank=r)
            expect = torch.cat([pieces[j * tp + r] for j in range(stride)], dim=dim)
            assert torch.equal(split_tp(full, _param(expect.shape, dim, stride), mesh), expect)
    replicated = torch.nn.Parameter(torch.empty(6))
    assert torch.equal(split_tp(full[0], replicated, SimpleNamespace(tp=2, tp_rank=1)), full[0])
