"""The compiled kernels on a CUDA GPU in bfloat16 against the plain-PyTorch references (run by `make gpu-check`).

Skipped without CUDA. Tolerances are bf16's: outputs and gradients within 2e-2 (relative, atol scaled by
max|expected|) of the float32 reference on the same bf16 inputs; lengths not multiples of any block.
"""
import pytest
import torch

from lctrain.kernels.flash_attention import flash_attention, naive_attention
from lctrain.kernels.lightning_attention import lightning_attention, naive_lightning_attention
from lctrain.testing.compare import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,h,h_kv,sq,sk", [(True, 8, 2, 1000, 1000), (False, 4, 4, 333, 517),
                                                 (True, 4, 1, 300, 700)])
def test_flash_attention_bf16_matches_reference(d, causal, h, h_kv, sq, sk):
    torch.manual_seed(0)
    q = torch.randn(2, sq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, sk, h_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    o, lse = flash_attention(q, k, v, causal=causal)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = naive_attention(*ref, causal=causal)
    assert_close(o.float(), o_ref, "o", rtol=2e-2, atol=2e-2)
    assert_close(lse, lse_ref, "lse", rtol=1e-3, atol=1e-3)
    do = torch.randn_like(o)
    (o.float() * do.float()).sum().backward()
    (o_ref * do.float()).sum().backward()
    for name, x, x_ref in zip(("dq", "dk", "dv"), (q, k, v), ref):
        assert_close(x.grad.float(), x_ref.grad, name, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq", [1000, 5000])
def test_lightning_attention_bf16_matches_reference(d, seq):
    torch.manual_seed(0)
    h = 4
    q, k, v = (torch.randn(1, seq, h, d, device="cuda", dtype=torch.bfloat16).mul_(d ** -0.5).requires_grad_()
               for _ in range(3))
    log_decay = -torch.linspace(0.01, 1.0, h, device="cuda").requires_grad_()
    s0 = torch.randn(1, h, d, d, device="cuda", requires_grad=True)
    o, f = lightning_attention(q, k, v, log_decay, s0, output_final_state=True)
    ref = [x.detach().float().requires_grad_() for x in (q, k, v, log_decay, s0)]
    o_ref, f_ref = naive_lightning_attention(*ref, output_final_state=True)
    assert_close(o.float(), o_ref, "o", rtol=2e-2, atol=2e-2)
    assert_close(f, f_ref, "final", rtol=2e-2, atol=2e-2)
    do, d_final = torch.randn_like(o), torch.randn_like(f)
    ((o.float() * do.float()).sum() + (f * d_final).sum()).backward()
    ((o_ref * do.float()).sum() + (f_ref * d_final).sum()).backward()
    for name, x, x_ref in zip(("dq", "dk", "dv", "d log_decay", "d initial_state"), (q, k, v, log_decay, s0), ref):
        assert_close(x.grad.float(), x_ref.grad, name, rtol=2e-2, atol=2e-2)
