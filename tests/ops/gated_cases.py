"""Shared inputs and per-head comparisons of the gated-op tests (gla, gated delta rule, their LASP-2 forms)."""
from __future__ import annotations

import torch


def per_head_close(actual: torch.Tensor, expected: torch.Tensor, head_dim: int, rtol: float, name: str) -> None:
    """max |actual - expected| <= rtol * max |expected| for every head (heads along `head_dim`).

    A head whose reference is all zeros must match exactly up to rtol (absolute).
    """
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    a, e = (x.detach().double().movedim(head_dim, 0).reshape(x.shape[head_dim], -1) for x in (actual, expected))
    err = (a - e).abs().amax(1)
    ref = e.abs().amax(1).clamp_min(1.0 if e.abs().max() == 0 else 1e-300)
    rel = err / ref
    assert bool((rel <= rtol).all()), f"{name}: relative error per head {rel.tolist()} > {rtol}"


def make_gate(kind: str, gen: torch.Generator, b: int, s: int, h: int, dk: int, dtype=torch.float64,
              low: float = 0.0, high: float = 1.0) -> torch.Tensor | None:
    """Log gates in [-high, -low] of the given kind (none | head | scalar | vector)."""
    shape = {"none": None, "head": (h,), "scalar": (b, s, h), "vector": (b, s, h, dk)}[kind]
    if shape is None:
        return None
    return -(low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(dtype)


def make_qkv(gen: torch.Generator, b: int, s: int, h: int, dk: int, dv: int, dtype=torch.float64,
             normalize_k: bool = False):
    q, k = (torch.randn(b, s, h, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=gen, dtype=torch.float64)
    if normalize_k:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    return q.to(dtype), k.to(dtype), v.to(dtype)
