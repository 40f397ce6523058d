"""Gated linear attention: the chunked form equals the token-by-token recurrence (outputs, final state and the
gradients of q, k, v, g, initial state) for every gate shape, lengths that are not multiples of the chunk, and
gates near 0 and near 1 over a long sequence; the chunk map is the affine map of the recurrence."""
from __future__ import annotations

import pytest
import torch

from lctrain.ops.gla import (CHUNK_SIZE, VECTOR_CHUNK_SIZE, check_gate_values, gated_linear_attention,
                             gla_chunk_map, select_gla_backend)
from lctrain.ops.gla_ref import gla_recurrent
from lctrain.ops.linear_attention import linear_attention
from tests.ops.gated_cases import make_gate, make_qkv, per_head_close

KINDS = ("none", "head", "scalar", "vector")
RTOL64 = 1e-10


def _run(fn, q, k, v, g, s0, w, wf, **kw):
    """Output, final state and gradients of sum(o * w) + sum(final * wf)."""
    ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    gg = g.detach().clone().requires_grad_(True) if g is not None else None
    s = s0.detach().clone().requires_grad_(True) if s0 is not None else None
    o, final = fn(*ins, gg, initial_state=s, output_final_state=True, **kw)
    loss = (o.double() * w).sum() + (final.double() * wf).sum()
    wrt = ins + [x for x in (gg, s) if x is not None]
    return o, final, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 37, 100])
def test_chunk_equals_recurrent_float64(kind, n):
    gen = torch.Generator().manual_seed(1000 * n + KINDS.index(kind))
    b, h, dk, dv = 2, 3, 4, 5
    q, k, v = make_qkv(gen, b, n, h, dk, dv)
    g = make_gate(kind, gen, b, n, h, dk)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    w = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    wf = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    ref = _run(gla_recurrent, q, k, v, g, s0, w, wf, scale=0.7)
    # A small chunk too, so that short sequences also cross chunk boundaries.
    for chunk in (None, 5):
        out = _run(gated_linear_attention, q, k, v, g, s0, w, wf, scale=0.7, backend="chunk") if chunk is None \
            else _run(_chunk, q, k, v, g, s0, w, wf, scale=0.7, chunk_size=chunk)
        where = f"{kind} n={n} chunk={chunk}"
        per_head_close(out[0], ref[0], 2, RTOL64, f"o {where}")
        per_head_close(out[1], ref[1], 1, RTOL64, f"final {where}")
        names = ["dq", "dk", "dv"] + (["dg"] if g is not None else []) + ["ds0"]
        for name, a, e in zip(names, out[2], ref[2]):
            head_dim = 0 if (name == "dg" and kind == "head") else (1 if name == "ds0" else 2)
            per_head_close(a, e, head_dim, RTOL64, f"{name} {where}")


def _chunk(*args, chunk_size=None, **kw):
    from lctrain.ops.gla import _chunk_gla

    return _chunk_gla(*args, chunk_size=chunk_size, **kw)


def test_head_gate_is_lctrain_linear_attention():
    """A [h] gate is lightning attention's per-head decay: lambda^(t-s), lambda^(t+1) on the initial state."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(gen, 2, 50, 3, 4, 5)
    g = make_gate("head", gen, 2, 50, 3, 4)
    s0 = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    o, f = gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True)
    o_ref, f_ref = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, backend="reference")
    per_head_close(o, o_ref, 2, RTOL64, "o")
    per_head_close(f, f_ref, 1, RTOL64, "final")


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("strength", ["wipe", "keep"])
def test_extreme_gates_long_sequence(kind, strength):
    """Gates ~0 (log -30: the state is wiped every token) and ~1 (log -1e-6: almost no decay) over 4096 tokens.

    float64 chunked == recurrence at 1e-10; float32 chunked stays finite (outputs and gradients) and matches
    the float64 recurrence at float32 precision (4096-term sums: 1e-4 relative per head).
    """
    gen = torch.Generator().manual_seed(7)
    b, n, h, dk, dv = 1, 4096, 2, 2, 2
    q, k, v = make_qkv(gen, b, n, h, dk, dv, normalize_k=True)
    value = -30.0 if strength == "wipe" else -1e-6
    g = torch.full((b, n, h) if kind == "scalar" else (b, n, h, dk), value, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    w = torch.randn(b, n, h, dv, generator=gen, dtype=torch.float64)
    wf = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    ref = _run(gla_recurrent, q, k, v, g, s0, w, wf)
    out = _run(gated_linear_attention, q, k, v, g, s0, w, wf, backend="chunk")
    per_head_close(out[0], ref[0], 2, RTOL64, "o float64")
    per_head_close(out[1], ref[1], 1, RTOL64, "final float64")
    for i, (a, e) in enumerate(zip(out[2], ref[2])):
        per_head_close(a, e, 1 if i == len(ref[2]) - 1 else 2, 1e-9, f"grad {i} float64")
    f32 = _run(gated_linear_attention, *(x.float() for x in (q, k, v, g)), s0.float(), w, wf, backend="chunk")
    per_head_close(f32[0], ref[0], 2, 1e-4, "o float32")
    per_head_close(f32[1], ref[1], 1, 1e-4, "final float32")
    for i, (a, e) in enumerate(zip(f32[2], ref[2])):
        per_head_close(a, e, 1 if i == len(ref[2]) - 1 else 2, 1e-3, f"grad {i} float32")


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_map_is_the_affine_map(kind):
    """final(S0) = T S0 + M, with T and M from gla_chunk_map (T scalar or diagonal per head)."""
    gen = torch.Generator().manual_seed(11)
    b, n, h, dk, dv = 2, 45, 3, 4, 5
    q, k, v = make_qkv(gen, b, n, h, dk, dv)
    g = make_gate(kind, gen, b, n, h, dk)
    s0 = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    t, m = gla_chunk_map(k, v, g)
    assert t.shape == ((b, h, dk) if kind == "vector" else (b, h)) and m.shape == (b, h, dk, dv)
    _, final = gla_recurrent(q, k, v, g, initial_state=s0, output_final_state=True)
    t_full = t[..., None] if kind == "vector" else t[..., None, None]
    per_head_close(t_full * s0 + m, final, 1, RTOL64, "T S0 + M")
    # Gradients through the map equal those through the recurrence's final state.
    wf = torch.randn(b, h, dk, dv, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (k, v)] + ([g.clone().requires_grad_(True)] if g is not None
                                                                 else [])
    t, m = gla_chunk_map(*leaves[:2], leaves[2] if g is not None else None)
    t_full = t[..., None] if kind == "vector" else t[..., None, None]
    got = torch.autograd.grad(((t_full * s0 + m) * wf).sum(), leaves)
    leaves2 = [x.clone().requires_grad_(True) for x in leaves]
    _, final = gla_recurrent(q, *leaves2[:2], leaves2[2] if g is not None else None, initial_state=s0,
                             output_final_state=True)
    want = torch.autograd.grad((final * wf).sum(), leaves2)
    for i, (a, e) in enumerate(zip(got, want)):
        per_head_close(a, e, 0 if (i == 2 and kind == "head") else 2, RTOL64, f"map grad {i}")


def test_float32_and_bfloat16_inputs_keep_float32_states():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(gen, 1, 33, 2, 4, 4, dtype=torch.bfloat16)
    g = make_gate("vector", gen, 1, 33, 2, 4, dtype=torch.bfloat16)
    o, f = gated_linear_attention(q, k, v, g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    t, m = gla_chunk_map(k, v, g)
    assert t.dtype == m.dtype == torch.float32


def test_dispatch_and_checks():
    q = torch.zeros(1, 4, 2, 3)
    v = torch.zeros(1, 4, 2, 5)
    assert select_gla_backend(q, q, v, torch.zeros(1, 4, 2)) == "chunk"
    assert CHUNK_SIZE % VECTOR_CHUNK_SIZE == 0
    with pytest.raises(ValueError, match="log gate g must be"):
        gated_linear_attention(q, q, v, torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_linear_attention(q, q, v, None, initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="unknown gated linear attention backend"):
        gated_linear_attention(q, q, v, None, backend="nope")
    with pytest.raises(ValueError, match="finite and <= 0"):
        check_gate_values(torch.tensor([-1.0, 0.5]))
    with pytest.raises(ValueError, match="beta must be in"):
        check_gate_values(None, torch.tensor([0.5, 1.5]))
    check_gate_values(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 1.0]))
