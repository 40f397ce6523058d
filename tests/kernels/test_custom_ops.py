"""The kernels as torch custom ops: forward + backward on meta tensors (what the rehearsal and the planner see:
shapes, dtypes, GQA kv heads, no kernel launched), `torch.library.opcheck` (schema, fake kernel, autograd
registration, AOT dispatch) on CPU under Triton's interpreter, and flash-attn's ops on meta without flash-attn
installed."""
from __future__ import annotations

import pytest
import torch

from lctrain.kernels.flash_attention import flash_attention
from lctrain.kernels.flash_attention.triton import flash_attention_bwd_op, flash_attention_fwd_op
from lctrain.kernels.lightning_attention import lightning_attention
from lctrain.kernels.lightning_attention.chunk import lightning_attention_bwd_op, lightning_attention_fwd_op
from lctrain.ops.attention_flash_attn import flash_attn_fwd_op


def _meta(*shape, dtype=torch.bfloat16, grad=True):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("fn", [flash_attention, lambda q, k, v: flash_attn_fwd_op(q, k, v, True, 0.125)],
                         ids=["triton", "flash_attn"])
def test_softmax_ops_on_meta_forward_and_backward(fn):
    q, k, v = _meta(2, 48, 8, 64), _meta(2, 80, 2, 64), _meta(2, 80, 2, 64)
    o, lse = fn(q, k, v)
    assert o.device.type == "meta" and o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (2, 8, 48) and lse.dtype == torch.float32
    o.sum().backward()
    assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)  # dK/dV with kv heads
    assert k.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("final", [False, True])
def test_lightning_op_on_meta_forward_and_backward(final):
    q, k, v = _meta(2, 40, 4, 32), _meta(2, 40, 4, 32), _meta(2, 40, 4, 16)
    ld, s0 = _meta(4, dtype=torch.float32), _meta(2, 4, 32, 16, dtype=torch.float32)
    o, state = lightning_attention(q, k, v, ld, s0, final)
    assert o.shape == v.shape and o.dtype == v.dtype and (state is None) != final
    loss = o.sum() + (state.sum() if final else 0)
    loss.backward()
    assert [x.grad.shape for x in (q, k, v, ld, s0)] == [q.shape, k.shape, v.shape, ld.shape, s0.shape]


def test_flash_attention_ops_pass_opcheck(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, 2, 16, generator=g).to(device)
    k, v = (torch.randn(1, 20, 1, 16, generator=g).to(device) for _ in range(2))
    args = [x.requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(flash_attention_fwd_op, (*args, True, 0.25))
    o, lse = flash_attention_fwd_op(q.detach(), k.detach(), v.detach(), True, 0.25)
    do, d_lse = torch.randn_like(o), torch.randn_like(lse)
    torch.library.opcheck(flash_attention_bwd_op, (do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.25, d_lse))


def test_lightning_attention_ops_pass_opcheck(device):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 20, 2, 16, generator=g).to(device) for _ in range(2))
    v = torch.randn(1, 20, 2, 16, generator=g).to(device)
    ld = (-torch.rand(2, generator=g) * 0.3).to(device)
    s0 = torch.randn(1, 2, 16, 16, generator=g).to(device)
    args = [x.requires_grad_(True) for x in (q, k, v, ld, s0)]
    torch.library.opcheck(lightning_attention_fwd_op, (*args, True))
    do = torch.randn_like(v)
    plain = [x.detach() for x in (q, k, v)]
    torch.library.opcheck(lightning_attention_bwd_op, (*plain, do, ld.detach(), torch.randn_like(s0), s0.detach(),
                                                       True, True, True))


def test_torch_compile_traces_through_the_ops_in_one_graph():
    """fullgraph=True fails on any graph break: both kernels' ops trace (fake kernels) forward and backward."""
    def f(q, k, v, log_decay):
        o, lse = flash_attention(q, k, v)
        o2, _ = lightning_attention(o, o, o, log_decay)
        return o2.float().sum() + lse.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, k = _meta(1, 32, 2, 16, dtype=torch.float16), _meta(1, 32, 1, 16, dtype=torch.float16)
    log_decay = _meta(2, dtype=torch.float32)
    compiled(q, k, k, log_decay).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and log_decay.grad.shape == (2,)
