"""Flash attention Triton kernels vs the naive definition: o, lse and the gradients of q, k, v.

float32 kernels against the float64 reference, tolerance rtol = atol = 1e-5 (atol scaled by
max(1, max|expected|), lctrain.testing.compare);
lengths around the interpreter's 16 x 16 blocks (shorter, equal, not multiples), head dims that are not
powers of two, GQA/MQA, causal bottom-right alignment with sq < sk and sq > sk (rows with no key).
"""
import random

import pytest
import torch

from lctrain.kernels.flash_attention import (flash_attention, flash_attention_backward, flash_attention_forward,
                                             naive_attention)
from lctrain.ops.attention import attention_backends, attention_backward, attention_forward, select_backend
from lctrain.testing.compare import assert_close

CASES = [
    # b, sq, sk, h, h_kv, d, causal
    (1, 32, 32, 2, 2, 16, True),
    (2, 37, 37, 4, 2, 12, True),
    (1, 20, 45, 2, 1, 16, True),
    (1, 45, 20, 2, 2, 8, True),
    (2, 33, 17, 3, 3, 16, False),
    (1, 1, 23, 4, 1, 24, True),
]


def _inputs(b, sq, sk, h, h_kv, d, device, dtype=torch.float32):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, sk, h_kv, d, device=device, dtype=dtype) for _ in range(2))
    return seed, [q, k, v]


def _leaves(tensors, dtype=None):
    return [t.to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal", CASES)
def test_forward_and_gradients_match_naive(b, sq, sk, h, h_kv, d, causal, device):
    seed, inputs = _inputs(b, sq, sk, h, h_kv, d, device)
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    o, lse = flash_attention(*ours, causal=causal)
    o_ref, lse_ref = naive_attention(*ref, causal=causal)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq)
    assert_close(o, o_ref.float(), f"o (seed {seed})")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "rows without a visible key differ"
    seen = torch.isfinite(lse_ref)
    assert_close(lse[seen], lse_ref[seen].float(), f"lse (seed {seed})")
    # gradients through o and through lse (a loss on lse enters the backward as delta - d_lse)
    do, d_lse = torch.randn_like(o), torch.randn_like(lse)
    ((o * do).sum() + (lse * d_lse)[seen].sum()).backward()
    ((o_ref * do.double()).sum() + (lse_ref * d_lse.double())[seen].sum()).backward()
    for name, x, x_ref in zip(("dq", "dk", "dv"), ours, ref):
        assert_close(x.grad, x_ref.grad.float(), f"{name} (seed {seed})")


def test_rows_without_keys_are_zero(device):
    # sq > sk, causal: the first sq - sk queries precede every key
    _, (q, k, v) = _inputs(1, 40, 12, 2, 1, 16, device)
    o, lse = flash_attention_forward(q, k, v, causal=True)
    assert torch.equal(o[:, :28], torch.zeros_like(o[:, :28]))
    assert torch.isneginf(lse[:, :, :28]).all() and torch.isfinite(lse[:, :, 28:]).all()
    dq, dk, dv = flash_attention_backward(torch.randn_like(o), q, k, v, o, lse, causal=True)
    assert torch.equal(dq[:, :28], torch.zeros_like(dq[:, :28]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("h,h_kv", [(2, 2), (4, 1)])
def test_backward_from_merged_output(h, h_kv, device):
    # A ring step: the queries' own block (causal) plus earlier keys (non-causal), merged by log-sum-exp;
    # each part's backward takes the merged (o, lse) and must give the gradients of the joint attention.
    seed, (q, k, v) = _inputs(2, 24, 44, h, h_kv, 16, device)
    scale = 0.3
    parts = [(slice(0, 20), False), (slice(20, 44), True)]
    partial = [flash_attention_forward(q, k[:, sl], v[:, sl], causal=c, softmax_scale=scale) for sl, c in parts]
    lse = torch.logaddexp(partial[0][1], partial[1][1])  # [b, h, sq]
    o = sum(o_p * torch.exp(lse_p - lse).transpose(1, 2)[..., None] for o_p, lse_p in partial)
    do = torch.randn_like(q)
    grads = [flash_attention_backward(do, q, k[:, sl], v[:, sl], o, lse, causal=c, softmax_scale=scale)
             for sl, c in parts]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1)
    ref = _leaves([q, k, v], torch.float64)
    o_ref, lse_ref = naive_attention(*ref, causal=True, softmax_scale=scale)
    assert_close(o, o_ref.float(), f"merged o (seed {seed})")
    assert_close(lse, lse_ref.float(), f"merged lse (seed {seed})")
    (o_ref * do.double()).sum().backward()
    for name, x, x_ref in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert_close(x, x_ref.grad.float(), f"{name} (seed {seed})")


def test_half_precision_inputs(device):
    # bfloat16 on the GPU; float16 under the interpreter, whose tl.dot has no bfloat16 arithmetic (numpy)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    seed, inputs = _inputs(1, 29, 29, 2, 1, 16, device, dtype)
    o, lse = flash_attention_forward(*inputs, causal=True)
    o_ref, lse_ref = naive_attention(*inputs, causal=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o.float(), o_ref.float(), f"o (seed {seed})", rtol=2e-2, atol=2e-2)
    assert_close(lse, lse_ref, f"lse (seed {seed})", rtol=1e-3, atol=1e-3)
    do = torch.randn_like(o)
    grads = flash_attention_backward(do, *inputs, o, lse, causal=True)
    ref = _leaves(inputs)
    (naive_attention(*ref, causal=True)[0].float() * do.float()).sum().backward()
    for name, g, x_ref in zip(("dq", "dk", "dv"), grads, ref):
        assert g.dtype == dtype
        assert_close(g.float(), x_ref.grad.float(), f"{name} (seed {seed})", rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise(device):
    q = torch.randn(1, 8, 3, 16, device=device)
    kv = torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, q[..., :8], q[..., :8])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward(q, q, q, q, q, torch.zeros(1, 8, 3, device=device))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention(q, q, q)
    # the dispatch never picks "triton" for CPU tensors then
    assert select_backend(q, q, q, True).name != "triton"


@pytest.mark.parametrize("causal", [True, False])
def test_dispatch_forced_triton_matches_reference(causal, device):
    assert "triton" in attention_backends()
    seed, (q, k, v) = _inputs(1, 19, 27, 4, 2, 16, device)
    scale = 0.25
    o, lse = attention_forward(q, k, v, causal, scale, backend="triton")
    o_ref, lse_ref = attention_forward(q, k, v, causal, scale, backend="reference")
    assert_close(o, o_ref, f"o (seed {seed})")
    assert_close(lse, lse_ref, f"lse (seed {seed})")
    do = torch.randn_like(o)
    grads = attention_backward(do, q, k, v, o_ref, lse_ref, causal, scale, backend="triton")
    grads_ref = attention_backward(do, q, k, v, o_ref, lse_ref, causal, scale, backend="reference")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(g, g_ref, f"{name} (seed {seed})")


def test_backward_is_one_kernel(monkeypatch, device):
    # FlashAttention-2's scheme: one pass over key blocks computes dk, dv and (atomically) dq
    from lctrain.kernels.utils import TritonKernel

    launched = []
    original = TritonKernel.__getitem__
    monkeypatch.setattr(TritonKernel, "__getitem__", lambda self, grid: launched.append(self.fn.__name__)
                        or original(self, grid))
    _, (q, k, v) = _inputs(1, 24, 24, 2, 1, 16, device)
    o, lse = flash_attention_forward(q, k, v, causal=True)
    launched.clear()
    flash_attention_backward(torch.randn_like(o), q, k, v, o, lse, causal=True)
    assert launched == ["_backward_kernel"]
