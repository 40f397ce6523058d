"""The gated delta rule: the chunked WY / UT form equals the token-by-token recurrence (outputs, final state,
gradients of q, k, v, g, beta, initial state), beta = 0 and orthogonal keys reduce it to the gated form, gates
near 0 and 1 stay exact over a long sequence, and the chunk map is the recurrence's affine map."""
from __future__ import annotations

import pytest
import torch

from lctrain.ops.gated_delta import _chunk_gated_delta, gated_delta_chunk_map, gated_delta_rule
from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gla import gated_linear_attention
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close

RTOL64 = 1e-10


def _inputs(seed, b, n, h, dk, dv, gate="scalar", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(gen, b, n, h, dk, dv, normalize_k=True)
    g = make_gate(gate, gen, b, n, h, dk, high=0.5)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    w = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    wf = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    cast = [x.to(dtype) if x is not None else None for x in (q, k, v, g, beta, s0)]
    return cast, w, wf


def _run(fn, q, k, v, g, beta, s0, w, wf, **kw):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (q, k, v, g, beta, s0)]
    o, final = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
    loss = (o.double() * w).sum() + (final.double() * wf).sum()
    wrt = [x for x in leaves if x is not None]
    return o, final, dict(zip([n for n, x in zip(("q", "k", "v", "g", "beta", "s0"), leaves) if x is not None],
                              torch.autograd.grad(loss, wrt)))


def _compare(out, ref, rtol, where, gate="scalar"):
    per_head_close(out[0], ref[0], 2, rtol, f"o {where}")
    per_head_close(out[1], ref[1], 1, rtol, f"final {where}")
    assert out[2].keys() == ref[2].keys()
    for name in ref[2]:
        head_dim = 1 if name == "s0" else (0 if name == "g" and gate == "head" else 2)
        per_head_close(out[2][name], ref[2][name], head_dim, rtol, f"d{name} {where}")


@pytest.mark.parametrize("gate", ["scalar", "head", "none"])
@pytest.mark.parametrize("n", [1, 7, 37, 100])
def test_chunk_equals_recurrent_float64(gate, n):
    (q, k, v, g, beta, s0), w, wf = _inputs(100 + n, 2, n, 3, 4, 5, gate)
    ref = _run(gated_delta_rule_recurrent, q, k, v, g, beta, s0, w, wf, scale=0.6)
    out = _run(gated_delta_rule, q, k, v, g, beta, s0, w, wf, scale=0.6, backend="chunk")
    _compare(out, ref, RTOL64, f"{gate} n={n}", gate)
    small = _run(_chunk_gated_delta, q, k, v, g, beta, s0, w, wf, scale=0.6, chunk_size=5)
    _compare(small, ref, RTOL64, f"{gate} n={n} chunk=5", gate)


def test_unnormalised_keys():
    """The forms agree for any keys (the model normalises them; the algebra does not need it)."""
    (q, k, v, g, beta, s0), w, wf = _inputs(3, 1, 40, 2, 3, 4)
    k = k * 1.3
    ref = _run(gated_delta_rule_recurrent, q, k, v, g, beta, s0, w, wf)
    out = _run(_chunk_gated_delta, q, k, v, g, beta, s0, w, wf, chunk_size=16)
    _compare(out, ref, RTOL64, "unnormalised")


def test_beta_zero_is_pure_decay():
    """beta = 0: nothing is erased or written; the state only decays, o_t = q_t (prod_{r<=t} a_r) S0, which is
    the gated form with no writes (v = 0)."""
    (q, k, v, g, beta, s0), _, _ = _inputs(4, 2, 37, 3, 4, 5)
    o, f = gated_delta_rule(q, k, v, g, torch.zeros_like(beta), initial_state=s0, output_final_state=True)
    o_gla, f_gla = gated_linear_attention(q, k, torch.zeros_like(v), g, initial_state=s0, output_final_state=True)
    per_head_close(o, o_gla, 2, RTOL64, "o")
    per_head_close(f, f_gla, 1, RTOL64, "final")


def test_orthogonal_keys_is_gated_linear_attention():
    """With mutually orthogonal unit keys and no initial state there is nothing to erase along k_t, so the
    delta rule is gated linear attention with values beta_t v_t (this checks the write path)."""
    b, n, h, dk, dv = 2, 8, 2, 8, 3
    gen = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(b, h, dk, dk, generator=gen, dtype=torch.float64))[0]  # orthonormal columns
    k = basis.permute(0, 3, 1, 2)[:, :n]  # [b, n, h, dk], token t gets column t
    q = torch.randn(b, n, h, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    beta = torch.rand(b, n, h, generator=gen, dtype=torch.float64)
    o, f = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_gla, f_gla = gated_linear_attention(q, k, beta[..., None] * v, g, output_final_state=True)
    per_head_close(o, o_gla, 2, RTOL64, "o")
    per_head_close(f, f_gla, 1, RTOL64, "final")


@pytest.mark.parametrize("value", [-30.0, -1e-6])
def test_extreme_gates_long_sequence(value):
    """Gates ~0 (state wiped each token) and ~1 (almost no decay) over 4096 tokens: float64 chunk == recurrence
    at 1e-10 (outputs, final state, every gradient); float32 chunk matches at float32 precision."""
    (q, k, v, g, beta, s0), w, wf = _inputs(6, 1, 4096, 2, 2, 2)
    g = torch.full_like(g, value)
    ref = _run(gated_delta_rule_recurrent, q, k, v, g, beta, s0, w, wf)
    out = _run(gated_delta_rule, q, k, v, g, beta, s0, w, wf, backend="chunk")
    _compare(out, ref, 1e-9, f"float64 g={value}")
    f32 = _run(gated_delta_rule, *(x.float() for x in (q, k, v, g, beta, s0)), w, wf, backend="chunk")
    per_head_close(f32[0], ref[0], 2, 1e-4, "o float32")
    per_head_close(f32[1], ref[1], 1, 1e-4, "final float32")
    for name in ref[2]:
        per_head_close(f32[2][name], ref[2][name], 1 if name == "s0" else 2, 1e-3, f"d{name} float32")


def test_chunk_map_is_the_affine_map():
    """final(S0) = T S0 + M with T, M from gated_delta_chunk_map (T a full dk x dk matrix), and its gradients."""
    (q, k, v, g, beta, s0), _, wf = _inputs(8, 2, 45, 3, 4, 5)
    for chunk in (None, 7):
        t, m = gated_delta_chunk_map(k, v, g, beta, chunk_size=chunk)
        assert t.shape == (2, 3, 4, 4) and m.shape == (2, 3, 4, 5)
        _, final = gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        per_head_close(t @ s0 + m, final, 1, RTOL64, f"T S0 + M chunk={chunk}")
    leaves = [x.clone().requires_grad_(True) for x in (k, v, g, beta)]
    t, m = gated_delta_chunk_map(*leaves, chunk_size=16)
    got = torch.autograd.grad(((t @ s0 + m) * wf).sum(), leaves)
    leaves2 = [x.clone().requires_grad_(True) for x in (k, v, g, beta)]
    _, final = gated_delta_rule_recurrent(q, *leaves2, initial_state=s0, output_final_state=True)
    want = torch.autograd.grad((final * wf).sum(), leaves2)
    for name, a, e in zip(("k", "v", "g", "beta"), got, want):
        per_head_close(a, e, 2, RTOL64, f"map d{name}")


def test_checks():
    q = torch.zeros(1, 4, 2, 3)
    v = torch.zeros(1, 4, 2, 5)
    beta = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="not a vector gate"):
        gated_delta_rule(q, q, v, torch.zeros(1, 4, 2, 3), beta)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, q, v, None, torch.zeros(1, 4))
    o, f = gated_delta_rule(q.bfloat16(), q.bfloat16(), v.bfloat16(), None, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
