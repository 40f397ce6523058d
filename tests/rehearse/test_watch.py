"""The dtype watcher honours `fp32_by_design` (forward and the autograd engine's backward) and nothing else; the
plain-PyTorch chunk backends issue no float32 matmul under bf16 (meta tensors, forward and backward)."""
import pytest
import torch

from lctrain.ops.gated_delta import chunk_gated_delta, gated_delta_chunk_map
from lctrain.ops.gla import chunk_gla, gla_chunk_map
from lctrain.ops.linear_attention import chunk_linear_attention, memory_state
from lctrain.ops.precision import fp32_by_design
from lctrain.rehearse.watch import DeviceDtypeWatcher, Phase


def _meta(*shape, dtype=torch.float32, grad=True):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _watch():
    return DeviceDtypeWatcher(Phase("step", 2), torch.bfloat16)


def test_marked_fp32_matmuls_are_counted_not_failed_forward_and_backward():
    a, b = _meta(3, 5, 7), _meta(3, 7, 2)
    with _watch() as w:
        with fp32_by_design("state fold"):
            y = a @ b
        y.sum().backward()  # the engine's two backward bmm's: the flag is off there, the operands are marked
    assert not w.findings, w.findings
    assert w.by_design["state fold"] == [1, 2 * 3 * 5 * 7 * 2]
    assert w.by_design["state fold (backward)"][0] == 2
    assert any("state fold" in n and "1 matmul(s), 420 FLOPs" in n for n in w.by_design_notes())


def test_unmarked_fp32_matmuls_fail_forward_and_backward():
    a, b = _meta(3, 5, 7), _meta(3, 7, 2)
    with fp32_by_design("earlier block"):
        pass
    with _watch() as w:
        y = a @ b  # planted: a float32 matmul under bf16 outside any marked block
        y.sum().backward()
    assert len(w.findings) == 3 and {f.kind for f in w.findings} == {"fp32_matmul"}
    assert w.findings[0].line.startswith("tests/rehearse/test_watch.py")
    assert not w.by_design
    with _watch() as w:  # a marked tensor used outside the block in the forward is not excused
        with fp32_by_design("state fold"):
            s = a @ b
        s.transpose(-1, -2) @ a.transpose(-1, -2)[..., :5, :]
    assert len(w.findings) == 1


@pytest.mark.parametrize("op", ["linear", "gla_scalar", "gla_vector", "delta", "maps"])
def test_chunk_backends_issue_no_fp32_matmul_under_bf16(op):
    b, n, h, d = 1, 130, 2, 16  # three chunks, the last one short
    q, k, v = (_meta(b, n, h, d, dtype=torch.bfloat16) for _ in range(3))
    with _watch() as w:
        if op == "linear":
            o, s = chunk_linear_attention(q, k, v, _meta(h), _meta(b, h, d, d), output_final_state=True)
            out = o.float().sum() + s.sum() + memory_state(k, v, _meta(h)).sum()
        elif op == "gla_scalar":
            o, s = chunk_gla(q, k, v, _meta(b, n, h), initial_state=_meta(b, h, d, d), output_final_state=True)
            out = o.float().sum() + s.sum()
        elif op == "gla_vector":
            o, s = chunk_gla(q, k, v, _meta(b, n, h, d), output_final_state=True)
            out = o.float().sum() + s.sum() + gla_chunk_map(k, v, _meta(b, n, h, d))[1].sum()
        elif op == "delta":
            o, s = chunk_gated_delta(q, k, v, _meta(b, n, h), _meta(b, n, h, dtype=torch.bfloat16),
                                     initial_state=_meta(b, h, d, d), output_final_state=True)
            out = o.float().sum() + s.sum()
        else:
            t, m = gated_delta_chunk_map(k, v, _meta(b, n, h), _meta(b, n, h, dtype=torch.bfloat16))
            out = t.sum() + m.sum()
        out.backward()
    assert not w.findings, [(f.line, f.detail) for f in w.findings]
    assert q.grad is not None or op == "maps"
