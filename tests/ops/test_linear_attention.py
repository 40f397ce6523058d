"""Linear attention: the chunked backend equals the naive definition (output, final state, every gradient),
and the backend dispatch picks, forces and registers backends as documented."""
import pytest
import torch

from lctrain.ops.debug import check_log_decay, debug_checks
import lctrain.ops.linear_attention as la
from lctrain.ops.linear_attention import (default_log_decay, linear_attention, memory_state,
                                          register_linear_attention_backend, select_linear_attention_backend,
                                          use_linear_attention_backend)
from lctrain.ops.linear_attention_ref import linear_attention_ref
from lctrain.testing.compare import assert_close


def _inputs(b, n, h, dk, dv, decay, init, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype) for d in (dk, dk, dv))
    ld = -(0.01 + torch.rand(h, generator=g, dtype=torch.float64)) if decay else None
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64) if init else None
    if dtype != torch.float64:
        ld = ld.float() if ld is not None else None
        s0 = s0.float() if s0 is not None else None
    return q, k, v, ld, s0


def _run(fn, q, k, v, ld, s0, learn_decay, w, wf):
    ins = [x.detach().requires_grad_(True) for x in (q, k, v)]
    s0 = s0.detach().requires_grad_(True) if s0 is not None else None
    ld = ld.detach().requires_grad_(learn_decay) if ld is not None else None
    o, final = fn(*ins, ld, s0, True)
    wrt = ins + [x for x in (s0, ld) if x is not None and x.requires_grad]
    grads = torch.autograd.grad((o.double() * w).sum() + (final.double() * wf).sum(), wrt)
    return o, final, grads


@pytest.mark.parametrize("n", [1, 7, 16, 37])
@pytest.mark.parametrize("decay", [None, "fixed", "learned"])
@pytest.mark.parametrize("init", [False, True])
def test_chunk_matches_reference_float64(monkeypatch, n, decay, init):
    monkeypatch.setattr(la, "CHUNK_SIZE", 8)  # several chunks, the last one short
    b, h, dk, dv = 2, 3, 4, 5
    q, k, v, ld, s0 = _inputs(b, n, h, dk, dv, decay, init)
    w = torch.randn(b, n, h, dv, dtype=torch.float64)
    wf = torch.randn(b, h, dk, dv, dtype=torch.float64)
    chunk = lambda *a: linear_attention(*a, backend="chunk")  # noqa: E731
    o, final, grads = _run(chunk, q, k, v, ld, s0, decay == "learned", w, wf)
    o_ref, final_ref, grads_ref = _run(linear_attention_ref, q, k, v, ld, s0, decay == "learned", w, wf)
    assert o.shape == (b, n, h, dv) and o.dtype == torch.float64 and final.dtype == torch.float64
    assert_close(o, o_ref, "o")
    assert_close(final, final_ref, "final state")
    names = ["dq", "dk", "dv"] + (["dS0"] if init else []) + (["dlog_decay"] if decay == "learned" else [])
    assert len(grads) == len(grads_ref) == len(names)
    for name, g, r in zip(names, grads, grads_ref):
        assert_close(g, r, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_low_precision_inputs_accumulate_in_float32(monkeypatch, dtype):
    monkeypatch.setattr(la, "CHUNK_SIZE", 16)
    q, k, v, ld, s0 = _inputs(2, 50, 2, 8, 6, True, True, dtype=dtype)
    o, final = linear_attention(q, k, v, ld, s0, output_final_state=True, backend="chunk")
    assert o.dtype == dtype and final.dtype == torch.float32
    o_ref, final_ref = linear_attention_ref(*(x.double() for x in (q, k, v, ld, s0)), output_final_state=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(o.double(), o_ref, "o", rtol=tol, atol=tol)
    assert_close(final.double(), final_ref, "final", rtol=tol, atol=tol)


def test_memory_state_is_the_final_state_from_zero():
    q, k, v, ld, _ = _inputs(2, 9, 3, 4, 2, True, False)
    assert_close(memory_state(k, v, ld), linear_attention_ref(q, k, v, ld, output_final_state=True)[1])
    assert_close(memory_state(k, v), linear_attention_ref(q, k, v, output_final_state=True)[1])


def test_default_log_decay_is_lightning_attention_slopes():
    assert torch.allclose(default_log_decay(8), -torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(default_log_decay(4), -torch.tensor([2.0 ** (-2 * (i + 1)) for i in range(4)]))
    # Not a power of two: the 4 slopes of H=4, then every other slope of H=8.
    six = default_log_decay(6)
    assert torch.allclose(six, torch.cat([default_log_decay(4), default_log_decay(8)[0::2][:2]]))
    assert (six < 0).all() and six.dtype == torch.float32
    deep = default_log_decay(8, layer_idx=3, num_layers=4)
    assert torch.allclose(deep, default_log_decay(8) * 1e-5)
    with pytest.raises(ValueError, match="both"):
        default_log_decay(8, layer_idx=1)


def test_dispatch_forces_and_registers(monkeypatch, request):
    request.addfinalizer(lambda: la.REGISTRY.unregister("fake"))
    monkeypatch.delenv("LCTRAIN_LINEAR_BACKEND", raising=False)
    q, k, v, ld, _ = _inputs(1, 5, 2, 3, 3, True, False)
    assert select_linear_attention_backend(q, k, v, ld) == "chunk"
    assert select_linear_attention_backend(q, k, v, ld, backend="reference") == "reference"
    with use_linear_attention_backend("reference"):
        assert select_linear_attention_backend(q, k, v, ld) == "reference"
    monkeypatch.setenv("LCTRAIN_LINEAR_BACKEND", "reference")
    assert select_linear_attention_backend(q, k, v, ld) == "reference"
    monkeypatch.delenv("LCTRAIN_LINEAR_BACKEND")

    calls = []

    def fake(q, k, v, log_decay=None, initial_state=None, output_final_state=False):
        calls.append(q.shape[1])
        return linear_attention_ref(q, k, v, log_decay, initial_state, output_final_state)

    # One call registers a backend; automatic dispatch uses it only where `supports` says so.
    register_linear_attention_backend("fake", fake, supports=lambda q, k, v, ld: q.shape[1] > 4, priority=100)
    linear_attention(q, k, v, ld)
    linear_attention(q[:, :3], k[:, :3], v[:, :3], ld)
    assert calls == [5]
    with pytest.raises(ValueError, match="unknown linear attention backend 'nope'"):
        linear_attention(q, k, v, backend="nope")


def test_bad_inputs_are_clear_errors():
    q, k, v, ld, s0 = _inputs(2, 5, 3, 4, 2, True, True)
    # Values are checked only under the debug switch (the check synchronises the device).
    with debug_checks(), pytest.raises(ValueError, match="log_decay must be <= 0"):
        linear_attention(q, k, v, -ld)
    linear_attention(q, k, v, -ld)
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        check_log_decay(-ld)
    with pytest.raises(ValueError, match=r"log_decay must be \[heads\]"):
        linear_attention(q, k, v, ld[:2])
    with pytest.raises(ValueError, match="q and k must be"):
        linear_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match="v must be"):
        linear_attention(q, k, v[:1])
    with pytest.raises(ValueError, match="initial_state must be"):
        linear_attention(q, k, v, ld, s0[:1])


def test_on_gpu_the_unvalidated_kernel_ranks_below_the_pytorch_backends(monkeypatch):
    from lctrain.ops import registry

    monkeypatch.delenv("LCTRAIN_ALLOW_UNVALIDATED_GPU", raising=False)
    monkeypatch.setattr(registry, "_on_gpu", lambda case: True)  # as if q lived on a GPU
    q = torch.randn(1, 4, 2, 3)
    order = [be.name for be in la.REGISTRY.candidates(q, q, q, None)]
    assert order[:2] == ["chunk", "reference"], order
    assert all(not be.validated_on_gpu for be in la.REGISTRY.candidates(q, q, q, None)[2:]), order


def test_chunk_backends_keep_only_their_inputs():
    """The "chunk" backends of linear attention, GLA and the gated delta rule keep exactly their inputs for backward
    (fla's memory model; the plain graph keeps 5-10x more), and their gradients equal the plain graph's."""
    from lctrain.ops.chunk_recompute import differentiate_now
    from lctrain.ops.gated_delta import gated_delta_rule
    from lctrain.ops.gla import gated_linear_attention
    from lctrain.testing.hot_path import track_saved_tensors

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    b, n, h, d = 1, 100, 2, 16
    q, k, v = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g_scalar = -torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    g_vector = -torch.rand(b, n, h, d, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, d, d, generator=gen, dtype=torch.float64)
    decay = -torch.rand(h, generator=gen, dtype=torch.float64)
    cases = {
        "linear": (lambda q, k, v, s0: linear_attention(q, k, v, decay, initial_state=s0, output_final_state=True,
                                                        backend="chunk"),
                   (q, k, v, s0)),
        "gla": (lambda q, k, v, g, s0: gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,
                                                              backend="chunk"), (q, k, v, g_vector, s0)),
        "delta": (lambda q, k, v, g, bt, s0: gated_delta_rule(q, k, v, g, bt, initial_state=s0, output_final_state=True,
                                                              backend="chunk"), (q, k, v, g_scalar, beta, s0)),
    }
    for name, (fn, inputs) in cases.items():
        results = {}
        for lean in (True, False):
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            with track_saved_tensors() as rec:
                if lean:
                    o, final = fn(*leaves)
                else:
                    with differentiate_now():
                        o, final = fn(*leaves)
            (o.sum() + (final * 0.5).sum()).backward()
            results[lean] = (rec.bytes, o.detach(), final.detach(), [x.grad for x in leaves])
        inputs_bytes = sum(x.numel() * x.element_size() for x in inputs)
        assert results[True][0] <= inputs_bytes + 8 * h, (name, results[True][0], inputs_bytes)  # (+ a [h] decay)
        assert results[False][0] > 3 * inputs_bytes, (name, results[False][0])  # the plain graph: the check can fail
        assert torch.equal(results[True][1], results[False][1]) and torch.equal(results[True][2], results[False][2])
        for got, want in zip(results[True][3], results[False][3]):
            assert torch.allclose(got, want, rtol=0, atol=1e-13), name
