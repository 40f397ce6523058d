"""Memory-bound bytes, op by op: only ops that read or write tensor data count, each by what it touches
(lctrain.plan.simulate.memory_op_bytes), and FLOP ops by (scope, class, dtype)."""
from __future__ import annotations

import pytest
import torch

from lctrain.plan.simulate import StepTracker, memory_op_bytes

F32 = 4


def _bytes(fn, *tensors) -> tuple[float, dict]:
    with StepTracker() as t:
        fn(*tensors)
    return t.memory_bytes, dict(t.bytes_detail)


@pytest.mark.parametrize("name,fn", [
    ("view", lambda x: x.view(8, 4)), ("reshape of contiguous", lambda x: x.reshape(32)),
    ("t", lambda x: x.t()), ("expand", lambda x: x[:1].expand(4, 8)), ("detach", lambda x: x.detach()),
    ("as_strided", lambda x: x.as_strided((2, 2), (1, 1))), ("empty_like", lambda x: torch.empty_like(x)),
    ("empty", lambda x: torch.empty(4, 8)), ("transpose", lambda x: x.transpose(0, 1)),
    ("slice", lambda x: x[1:3]), ("unsqueeze", lambda x: x.unsqueeze(0)), ("device", lambda x: x.device),
])
def test_metadata_ops_move_nothing(name, fn):
    x = torch.randn(4, 8)
    assert _bytes(fn, x)[0] == 0, name


def test_data_ops_count_what_they_touch():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    n = 32 * F32
    assert _bytes(lambda a, b: a + b, x, y) == (3 * n, {"embed/loss|elementwise|": 3 * n})
    assert _bytes(lambda a: a.exp(), x)[0] == 2 * n
    assert _bytes(lambda a, b: a.add_(b), x.clone(), y)[0] == 3 * n  # read self + other, write self
    assert _bytes(lambda a: torch.zeros_like(a), x) == (n, {"embed/loss|fill|": n})  # a memset writes
    assert _bytes(lambda a, b: a.copy_(b), x.clone(), y) == (2 * n, {"embed/loss|copy|": 2 * n})
    assert _bytes(lambda a: a.t().contiguous(), x)[1] == {"embed/loss|copy|": 2 * n}
    assert _bytes(lambda a: a.to(torch.bfloat16), x)[0] == n + n // 2
    assert _bytes(lambda a: a.sum(-1), x) == (n + 4 * F32, {"embed/loss|reduction|": n + 4 * F32})
    # A broadcast operand is read once, not once per output element.
    row = torch.randn(8)
    assert _bytes(lambda a, b: a * b, x, row)[0] == n + 8 * F32 + n
    assert _bytes(lambda a, b: a * b.expand(4, 8), x, row)[0] == n + 8 * F32 + n


def test_indexing_reads_only_the_selected_rows():
    weight, ids = torch.randn(1000, 16), torch.tensor([[1, 5, 7]])
    out = 3 * 16 * F32
    assert _bytes(lambda w, i: torch.nn.functional.embedding(i, w), weight, ids)[0] == 3 * 8 + 2 * out
    assert _bytes(lambda w, i: w.index_select(0, i[0]), weight, ids)[0] == 3 * 8 + 2 * out
    dst, src = torch.zeros(1000, 16), torch.randn(3, 16)
    assert _bytes(lambda d, s, i: d.index_copy_(0, i[0], s), dst, src, ids)[0] == 3 * 8 + 2 * out


def test_out_variant_counts_the_output_once():
    x, o = torch.randn(4, 8), torch.empty(4, 8)
    assert _bytes(lambda a, b: torch.exp(a, out=b), x, o)[0] == 2 * 32 * F32


def test_flop_ops_are_booked_by_class_and_dtype_not_bytes():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    with StepTracker() as t:
        a @ b
        a.bfloat16() @ b.bfloat16()
        torch.bmm(a[None], b[None])
    assert t.flops_detail == {"embed/loss|matmul|fp32": 2 * 4 * 8 * 16, "embed/loss|matmul|bf16": 2 * 4 * 8 * 16,
                              "embed/loss|linear_attention|fp32": 2 * 4 * 8 * 16}
    assert t.memory_bytes == (32 + 128) * (4 + 2)  # the two casts only: read float32, write bf16
    unit = torch.eye(6) + torch.randn(6, 6).tril(-1)
    with StepTracker() as t:
        torch.linalg.solve_triangular(unit, torch.randn(6, 5), upper=False, unitriangular=True)
    assert t.flops_detail == {"embed/loss|linear_attention|fp32": 6 * 6 * 5}


def test_rule_function_directly():
    x = torch.randn(2, 3)
    assert memory_op_bytes(torch.ops.aten.detach.default, (x,), {}, x) is None
    assert memory_op_bytes(torch.ops.aten.clone.default, (x,), {}, x.clone()) == ("copy", 48)


def test_lctrain_attention_ops_count_as_attention():
    """The Triton flash kernel's custom op (what a GPU run calls), on meta tensors: causal FLOPs by formula."""
    pytest.importorskip("triton")
    from lctrain.kernels.flash_attention import triton as flash  # noqa: F401  (registers lctrain::flash_attention_*)

    b, s, h, d = 1, 64, 2, 16
    q = torch.empty(b, s, h, d, device="meta", dtype=torch.bfloat16)
    with StepTracker() as t:
        o, lse = torch.ops.lctrain.flash_attention_fwd(q, q, q, True, 0.25)
        torch.ops.lctrain.flash_attention_bwd(o, q, q, q, o, lse, True, 0.25, None)
    fwd = 4 * b * h * d * s * (s + 1) / 2
    assert t.flops_detail == {"embed/loss|attention|bf16": 3 * fwd}
