"""Lightning attention Triton kernels vs the naive definition: output, final state and every gradient.

float32 kernels against the float64 reference, tolerance rtol = atol = 1e-5 (atol scaled by
max(1, max|expected|), lctrain.testing.compare); d log_decay at 1e-4, being a sum over every token of
position-weighted differences of large terms, (t+1)(q.dq - k.dk), whose float32 error grows with the length;
sequence lengths around the interpreter's block of 16 (shorter, equal, not a multiple) and its segment
of 32 tokens (one segment, several run in parallel); head dims that are not powers of two and value
dims split over several column tiles.
"""
import random

import pytest
import torch

from lctrain.kernels.lightning_attention import lightning_attention, naive_lightning_attention
from lctrain.kernels.lightning_attention.chunk import _segments
from lctrain.kernels.utils import triton_available_for
from lctrain.ops.linear_attention import linear_attention, linear_attention_backends, select_linear_attention_backend
from lctrain.testing.compare import assert_close

CASES = [
    # b, s, h, dk, dv, decay, initial_state, output_final_state
    (1, 16, 2, 16, 16, False, False, False),
    (2, 37, 2, 12, 24, True, True, True),
    (1, 50, 3, 20, 8, True, False, True),
    (1, 5, 1, 8, 8, True, True, True),
    (2, 33, 1, 16, 16, False, True, True),
    (1, 100, 2, 8, 16, True, True, True),
]


def _inputs(b, s, h, dk, dv, decay, initial, device):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    q, k = (torch.randn(b, s, h, dk, device=device) * 0.5 for _ in range(2))
    v = torch.randn(b, s, h, dv, device=device) * 0.5
    log_decay = -torch.rand(h, device=device) * 0.5 - 0.01 if decay else None
    s0 = torch.randn(b, h, dk, dv, device=device) if initial else None
    return seed, [q, k, v, log_decay, s0]


def _leaves(tensors, dtype=None):
    return [None if t is None else t.to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def _assert_grads(names, ours, ref, seed):
    for name, x, x_ref in zip(names, ours, ref):
        if x is None:
            continue
        tol = 1e-4 if name == "d log_decay" else None
        assert_close(x.grad, x_ref.grad.to(x.grad.dtype), f"{name} (seed {seed})", rtol=tol, atol=tol)


_NAMES = ("dq", "dk", "dv", "d log_decay", "d initial_state")


@pytest.mark.parametrize("b,s,h,dk,dv,decay,initial,final", CASES)
def test_forward_and_gradients_match_naive(b, s, h, dk, dv, decay, initial, final, device):
    seed, inputs = _inputs(b, s, h, dk, dv, decay, initial, device)
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    o, f = lightning_attention(*ours, output_final_state=final)
    o_ref, f_ref = naive_lightning_attention(*ref, output_final_state=final)
    assert_close(o, o_ref.float(), f"o (seed {seed})")
    assert (f is None) == (f_ref is None) == (not final)
    do = torch.randn_like(o)
    loss, loss_ref = (o * do).sum(), (o_ref * do.double()).sum()
    if final:
        assert f.dtype == torch.float32
        assert_close(f, f_ref.float(), f"final state (seed {seed})")
        d_final = torch.randn_like(f)
        loss, loss_ref = loss + (f * d_final).sum(), loss_ref + (f_ref * d_final.double()).sum()
    loss.backward()
    loss_ref.backward()
    _assert_grads(_NAMES, ours, ref, seed)


def test_gradient_of_final_state_alone(device):
    seed, inputs = _inputs(1, 21, 2, 8, 16, True, True, device)
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    d_final = torch.randn(1, 2, 8, 16, device=device)
    (lightning_attention(*ours, output_final_state=True)[1] * d_final).sum().backward()
    (naive_lightning_attention(*ref, output_final_state=True)[1] * d_final.double()).sum().backward()
    assert ref[0].grad is None and torch.equal(ours[0].grad, torch.zeros_like(ours[0])), "the final state has no q"
    _assert_grads(_NAMES[1:], ours[1:], ref[1:], seed)


def test_gradients_of_some_inputs_only(device):
    seed, (q, k, v, log_decay, s0) = _inputs(2, 26, 2, 8, 16, True, True, device)
    ours, ref = _leaves([q, v]), _leaves([q, v], torch.float64)
    do = torch.randn(2, 26, 2, 16, device=device)
    (lightning_attention(ours[0], k, ours[1], log_decay, s0)[0] * do).sum().backward()
    k64, decay64, s064 = k.double(), log_decay.double(), s0.double()
    (naive_lightning_attention(ref[0], k64, ref[1], decay64, s064)[0] * do.double()).sum().backward()
    _assert_grads(("dq", "dv"), ours, ref, seed)


def test_strong_decay_stays_finite(device):
    # lambda = e^-30: every power underflows to 0 but none overflows (no inf * 0 = NaN in masked entries)
    _, (q, k, v, _, s0) = _inputs(1, 40, 2, 16, 16, False, True, device)
    log_decay = torch.full((2,), -30.0, device=device)
    o, f = lightning_attention(q, k, v, log_decay, s0, output_final_state=True)
    o_ref, f_ref = naive_lightning_attention(q, k, v, log_decay, s0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    assert_close(o, o_ref, "o")
    assert_close(f, f_ref, "final state")


def test_half_precision_inputs(device):
    # bfloat16 on the GPU; float16 under the interpreter, whose tl.dot has no bfloat16 arithmetic (numpy)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    seed, (q, k, v, log_decay, s0) = _inputs(1, 24, 2, 16, 16, True, True, device)
    ours = _leaves([x.to(dtype) for x in (q, k, v)] + [log_decay, s0])
    ref = _leaves([x.to(dtype) for x in (q, k, v)] + [log_decay, s0], torch.float64)
    o, f = lightning_attention(*ours, output_final_state=True)
    o_ref, f_ref = naive_lightning_attention(*ref, output_final_state=True)
    assert o.dtype == dtype and f.dtype == torch.float32
    assert_close(o.float(), o_ref.float(), f"o (seed {seed})", rtol=2e-2, atol=2e-2)
    assert_close(f, f_ref.float(), f"final state (seed {seed})", rtol=2e-2, atol=2e-2)
    do, d_final = torch.randn_like(o), torch.randn_like(f)
    ((o.float() * do.float()).sum() + (f * d_final).sum()).backward()
    ((o_ref * do.double()).sum() + (f_ref * d_final.double()).sum()).backward()
    for name, x, x_ref in zip(_NAMES, ours, ref):
        assert x.grad.dtype == x.dtype
        assert_close(x.grad.float(), x_ref.grad.float(), f"{name} (seed {seed})", rtol=2e-2, atol=2e-2)


def test_segments_give_enough_programs():
    # H100 (132 SMs), 16 heads of 128, one 64K sequence: 32 programs -> 9 segments of 7296 tokens
    assert _segments(16, 65536, 128, 132) == (9, 7296)
    # many programs already, or a short sequence: one segment
    assert _segments(64 * 16, 1024, 128, 132) == (1, 1024)
    assert _segments(1, 700, 64, 132) == (1, 768)
    # the interpreter: 32-token segments
    assert _segments(2, 50, 16, None) == (2, 32)


def test_bad_inputs_raise(device):
    q = torch.randn(1, 8, 2, 4, device=device)
    with pytest.raises(ValueError, match="equal b, s, h"):
        lightning_attention(q, q, torch.randn(1, 9, 2, 4, device=device))
    with pytest.raises(ValueError, match="log_decay"):
        lightning_attention(q, q, q, log_decay=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, q, q, initial_state=torch.zeros(1, 2, 4, 5, device=device))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        lightning_attention(q.double(), q.double(), q.double())


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 4)
    assert not triton_available_for(q)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lightning_attention(q, q, q)


def test_dispatch_forced_triton_matches_reference(device):
    assert "triton" in linear_attention_backends()
    seed, inputs = _inputs(1, 19, 2, 8, 8, True, True, device)
    ours, ref = _leaves(inputs), _leaves(inputs)
    o, f = linear_attention(*ours, output_final_state=True, backend="triton")
    o_ref, f_ref = linear_attention(*ref, output_final_state=True, backend="reference")
    assert_close(o, o_ref, f"o (seed {seed})")
    assert_close(f, f_ref, f"final state (seed {seed})")
    ((o * o_ref.detach()).sum() + f.sum()).backward()
    ((o_ref * o_ref.detach()).sum() + f_ref.sum()).backward()
    _assert_grads(_NAMES, ours, ref, seed)
    # chosen automatically on CUDA only
    expected = "triton" if device.type == "cuda" else "chunk"
    assert select_linear_attention_backend(*inputs[:4]) == expected


@pytest.mark.parametrize("seq", [300])
def test_log_decay_gradient_keeps_float32_accuracy_per_head(seq, device):
    # d log_decay is a sum over query-key pairs of (t - s) lambda^(t-s) (q_t . k_s)(do_t . v_s) (+ the initial
    # and final state pairs); the kernel sums it in that form, every weight >= 0, so its error stays at
    # float32 rounding of the head's own gradient however long the sequence. (A closed form through
    # sum_t (t+1)(q_t . dq_t - k_t . dk_t) cancels terms ~T times larger: 1.6e-3 per head at T = 256, decay -2.)
    seed, (q, k, v, _, s0) = _inputs(1, seq, 3, 16, 16, False, True, device)
    log_decay = torch.tensor([-2.0, -0.3, -0.01], device=device)
    ours = _leaves([q, k, v, log_decay, s0])
    ref = _leaves([q, k, v, log_decay, s0], torch.float64)
    o, f = lightning_attention(*ours, output_final_state=True)
    o_ref, f_ref = naive_lightning_attention(*ref, output_final_state=True)
    do, d_final = torch.randn_like(o), torch.randn_like(f)
    ((o * do).sum() + (f * d_final).sum()).backward()
    ((o_ref * do.double()).sum() + (f_ref * d_final.double()).sum()).backward()
    expected = ref[3].grad
    per_head = ((ours[3].grad.double() - expected).abs() / expected.abs()).tolist()
    assert max(per_head) < 2e-5, f"d log_decay relative error per head {per_head} (seed {seed})"


def test_backward_is_two_recurrences(monkeypatch, device):
    # dq: the forward recurrence once; dk, dv, d initial_state, d log_decay: ONE reverse pass (and, with
    # several segments, its boundary pass), not a recurrence per gradient
    from lctrain.kernels.utils import TritonKernel

    launched = []
    original = TritonKernel.__getitem__
    monkeypatch.setattr(TritonKernel, "__getitem__", lambda self, grid: launched.append(self.fn.__name__)
                        or original(self, grid))
    _, inputs = _inputs(1, 20, 2, 8, 8, True, True, device)  # one 32-token segment under the interpreter
    leaves = _leaves(inputs)
    o, f = lightning_attention(*leaves, output_final_state=True)
    launched.clear()
    (o.sum() + f.sum()).backward()
    assert sorted(launched) == ["_forward_kernel", "_reverse_kernel"]
