"""Gated linear attention (fixed, scalar or vector log gates): backend dispatch, chunked PyTorch form, chunk map.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

with g of shape `[h]` (per-head decay), `[b, s, h]` (Mamba2 / simple GLA) or `[b, s, h, dk]` (GLA); the
token-by-token definition is gla_ref.py. `gated_linear_attention(...)` picks a backend per call like
`linear_attention` does (forced by `backend=`, `use_gla_backend(name)` or env LCTRAIN_GLA_BACKEND, else the
highest-priority one that supports the inputs): "recurrent" (gla_ref.py), "chunk" (below) and "fla"
(flash-linear-attention's chunk kernels, registered in gated_fla.py: CUDA tensors only, imported lazily).

The "chunk" form cuts the sequence into chunks of C tokens and works inside a chunk with the cumulative log
gates G_i = g_0 + ... + g_i *of that chunk only*; every exponent it takes is G_i, G_i - G_j (j <= i) or
G_last - G_j, all <= 0, the differences formed as segment sums g_(j+1) + ... + g_i (`segment_log_decay`,
no cancellation). So no overflow with gates near 0 (log gate -30: the state is wiped, the factors underflow
to their true limit 0, gradients stay exact) and no loss of precision with gates near 1 (log gate -1e-6 over
a million tokens: the sums never leave the chunk). Inside a chunk (i, j chunk positions):

    o_i   = scale * [ (q_i * exp(G_i)) S_c + sum_{j<=i} (q_i * exp(G_i - G_j)) . k_j  v_j ]
    S_c+1 = diag(exp(G_last)) S_c + sum_j (k_j * exp(G_last - G_j))^T v_j

A vector gate needs the pairwise factors exp(G_i - G_j) per key dimension ([C, C, dk] per chunk), so its
chunks are shorter (VECTOR_CHUNK_SIZE). Matmuls in the input dtype, gates and states in float32 (float64 for
float64 inputs; `lctrain.ops.precision`); autograd backward of a
graph rebuilt in backward: forward keeps only the inputs (`lctrain.ops.chunk_recompute`, fla's memory model).
Derivation and the cross-rank use: lctrain/sp/README_lasp2_gated.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from lctrain.ops.chunk_recompute import lean_apply
from lctrain.ops.gated_fla import fla_available, fla_gla, fla_supports_gla
from lctrain.ops.gla_ref import gate_as_vector, gate_kind, gla_recurrent
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.registry import BackendRegistry, always

#: Tokens per chunk of the "chunk" backend for no gate, per-head and scalar gates.
CHUNK_SIZE = 64
#: Tokens per chunk for vector gates (the intra-chunk factors are [C, C, dk]).
VECTOR_CHUNK_SIZE = 16

GatedFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class GatedBackend:
    """One local implementation of a gated linear-attention op (gated_linear_attention or gated_delta_rule)."""

    name: str
    """Name used to force it (`backend=`, `use_..._backend`, the op's environment variable)."""
    fn: GatedFn
    """The op's signature (see `gated_linear_attention` / `gated_delta_rule`) -> (o, final_state)."""
    supports: Callable[..., bool]
    """(q, k, v, g, beta) -> whether automatic dispatch may pick it for these inputs."""
    priority: int
    """Higher wins when several support a case ("chunk" is 10)."""
    is_available: Callable[[], bool] = lambda: True
    """Whether it can run in this process at all (checked without importing optional packages)."""
    validated_on_gpu: bool = False
    """Whether it has run and passed its tests on a GPU (on CUDA, automatic dispatch ranks unvalidated backends
    below validated ones; see lctrain.ops.registry). Plain PyTorch and fla's own kernels count as validated."""

    def available(self) -> bool:
        return self.is_available()


def to_chunks(x: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """`[b, n, h, ...]` -> `[b, h, nc, chunk, ...]` in `dtype`, zero-padded at the end to a whole chunk."""
    b, n, h = x.shape[:3]
    nc = max(1, -(-n // chunk))
    x = x.to(dtype).movedim(1, 2)  # [b, h, n, ...]
    if nc * chunk > n:
        x = torch.cat([x, x.new_zeros(b, h, nc * chunk - n, *x.shape[3:])], dim=2)
    return x.reshape(b, h, nc, chunk, *x.shape[3:])


def from_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `to_chunks`: `[b, h, nc, chunk, d]` -> `[b, n, h, d]`."""
    b, h, nc, c, d = x.shape
    return x.reshape(b, h, nc * c, d)[:, :, :n].transpose(1, 2)


def scalar_log_gate(g: torch.Tensor | None, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A none / `[h]` / `[b, s, h]` gate as `[b, s, h]` in `dtype` (differentiable)."""
    b, s, h, _ = q.shape
    if g is None:
        return torch.zeros(b, s, h, dtype=dtype, device=q.device)
    return g.to(dtype).expand(b, s, h)


def segment_log_decay(gc: torch.Tensor) -> torch.Tensor:
    """L[..., i, j] = g_(j+1) + ... + g_i for j <= i (0 on the diagonal), -inf above: `[..., c]` -> `[..., c, c]`.

    Built as a masked cumulative sum of the gates themselves rather than as G_i - G_j: no cancellation of
    large cumulative sums, so neither the values nor their gradients carry rounding from the chunk's total
    (a wiped state's gradient, ~1e-13, stays exact to the last digits).
    """
    c = gc.shape[-1]
    strict = torch.ones(c, c, dtype=torch.bool, device=gc.device).tril(-1)  # [i, j]: j < i
    x = gc[..., :, None].expand(*gc.shape, c).masked_fill(~strict, 0.0)  # x[i, j] = g_i for j < i
    return x.cumsum(-2).masked_fill(strict.T, float("-inf"))


def _chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None, scale: float = 1.0,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    kind = gate_kind(g, q)
    cdt = compute_dtype(q.dtype)
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size or (VECTOR_CHUNK_SIZE if kind == "vector" else CHUNK_SIZE)
    idt = q.dtype  # matmul operands in the input dtype, gates and states in cdt (lctrain.ops.precision)
    qc, kc, vc = (to_chunks(x, c, idt) for x in (q, k, v))  # [b, h, nc, c, d]
    if kind == "vector":
        gc = to_chunks(g, c, cdt)  # [b, h, nc, c, dk]
        G = gc.cumsum(3)  # chunk-local cumulative log gates
        seg = segment_log_decay(gc.movedim(-1, -2))  # [b, h, nc, dk, c, c]
        # Per-dimension pairwise decays: an elementwise product summed over dk in cdt (fla's diagonal blocks), no GEMM.
        scores = (qc.to(cdt)[..., :, None, :] * kc.to(cdt)[..., None, :, :]
                  * torch.exp(seg).movedim(-3, -1)).sum(-1).to(idt)  # [b, h, nc, c, c]
        q_dec = (qc.to(cdt) * torch.exp(G)).to(idt)
        k_dec = (kc.to(cdt) * torch.exp(seg[..., -1, :]).transpose(-1, -2)).to(idt)  # exp(G_last - G_j)
        chunk_decay = torch.exp(G[:, :, :, -1])[..., None]  # [b, h, nc, dk, 1]
    else:
        gc = to_chunks(scalar_log_gate(g, q, cdt)[..., None], c, cdt)[..., 0]  # [b, h, nc, c]
        G = gc.cumsum(3)
        seg = segment_log_decay(gc)  # [b, h, nc, c, c]
        scores = ((qc @ kc.transpose(-1, -2)).to(cdt) * torch.exp(seg)).to(idt)  # decayed in cdt, then rounded
        q_dec = (qc.to(cdt) * torch.exp(G)[..., None]).to(idt)
        k_dec = (kc.to(cdt) * torch.exp(seg[..., -1, :])[..., None]).to(idt)
        chunk_decay = torch.exp(G[..., -1])[..., None, None]  # [b, h, nc, 1, 1]
    o = (scores @ vc).to(cdt)  # [b, h, nc, c, dv], the intra-chunk part
    mem = (k_dec.transpose(-1, -2) @ vc).to(cdt)  # [b, h, nc, dk, dv], each chunk's state from a zero start

    state = (initial_state.to(cdt) if initial_state is not None
             else torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device))
    entering = []
    # unbind, not indexing per chunk: one backward node instead of a full-size gradient per chunk.
    for mem_j, decay_j in zip(mem.unbind(2), chunk_decay.unbind(2)):
        entering.append(state)
        state = decay_j * state + mem_j
    o = o + (q_dec @ torch.stack(entering, dim=2).to(idt)).to(cdt)
    o = from_chunks(o * scale, n)  # [b, n, h, dv]
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None, scale: float = 1.0,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "chunk" backend: `_chunk_gla` keeping only its inputs for backward (recomputed there)."""
    return lean_apply(lambda q, k, v, g, s0: _chunk_gla(q, k, v, g, scale, s0, output_final_state, chunk_size),
                      (q, k, v, g, initial_state))


def gla_chunk_map(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of a whole sequence on the state: S_out = T S_in + M (T diagonal, acting on dk).

    T = exp(sum_t g_t) and M = sum_j exp(sum_{t>j} g_t) k_j^T v_j. The suffix sums are reverse cumulative
    sums shifted by one token (sums of same-signed terms, no cancellation), so a long sequence keeps full
    relative precision wherever the factor is not negligible.

    Args:
        k: `[b, s, h, dk]`; v: `[b, s, h, dv]`; g: None, `[h]`, `[b, s, h]` or `[b, s, h, dk]`.
    Returns:
        T: `[b, h]` (no gate, `[h]` or `[b, s, h]`) or `[b, h, dk]` (vector gate); M: `[b, h, dk, dv]`; both
        float32 (float64 for float64 inputs), differentiable.
    """
    kind = gate_kind(g, k)
    cdt = compute_dtype(k.dtype)
    gv = gate_as_vector(g, k, cdt) if kind == "vector" else scalar_log_gate(g, k, cdt)  # [b, s, h(, dk)]
    total = gv.sum(1)  # [b, h(, dk)]
    after = torch.cat([gv.flip(1).cumsum(1).flip(1)[:, 1:], torch.zeros_like(gv[:, :1])], dim=1)  # sum_{t>j}
    w = torch.exp(after)
    kw = (k.to(cdt) * (w if kind == "vector" else w[..., None])).to(k.dtype)  # [b, s, h, dk], rounded for the GEMM
    return torch.exp(total), torch.einsum("bshk,bshv->bhkv", kw, v).to(cdt)


#: The registered backends; "fla" is registered by gated_fla.py (it imports fla only when called on CUDA).
REGISTRY: BackendRegistry[GatedBackend] = BackendRegistry("gated linear attention", "LCTRAIN_GLA_BACKEND")


def register_gla_backend(name: str, fn: GatedFn, supports: Callable[..., bool] | None = None, priority: int = 0,
                         is_available: Callable[[], bool] | None = None, validated_on_gpu: bool = False) -> None:
    """Register (or replace) a gated linear-attention backend.

    Args:
        name: the name `backend=` / `use_gla_backend` / LCTRAIN_GLA_BACKEND select it by.
        fn: `fn(q, k, v, g=None, scale=1.0, initial_state=None, output_final_state=False) -> (o, final)`.
        supports: `supports(q, k, v, g, beta) -> bool` for automatic dispatch (default: always).
        priority: automatic dispatch takes the highest-priority supporting backend ("chunk" is 10).
        is_available: whether it can run in this process (default: always).
        validated_on_gpu: whether it has run and passed its tests on a GPU.
    """
    REGISTRY.register(GatedBackend(name, fn, supports or always, priority, is_available or (lambda: True),
                                   validated_on_gpu))


def use_gla_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force backend `name` for every `gated_linear_attention` call in this thread inside the block."""
    return REGISTRY.use(name)


def select_gla_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                       backend: str | None = None) -> str:
    """The backend name `gated_linear_attention` would use for these inputs."""
    return REGISTRY.select(q, k, v, g, None, backend=backend, describe=lambda: _describe(q, v)).name


def _describe(q: torch.Tensor, v: torch.Tensor) -> str:
    return f"q {tuple(q.shape)} {q.dtype} on {q.device}, v {tuple(v.shape)}"


def check_gated_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                       beta: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                       delta: bool = False) -> str:
    """Raise ValueError when shapes do not fit a gated op; returns the gate kind.

    Only shapes and dtypes are checked (no host sync): `check_gate_values` checks g <= 0 and beta in [0, 1].
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [b, s, h, dk] with the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [b, s, h, dv] matching q's {tuple(q.shape[:3])} in b, s, h; got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    kind = gate_kind(g, q)
    b, s, h, dk = q.shape
    if delta:
        if kind == "vector":
            raise ValueError(f"the gated delta rule takes a scalar log gate per head and token, [b, s, h] = "
                             f"{[b, s, h]} (or [h]), not a vector gate {list(g.shape)}")
        if beta is None or tuple(beta.shape) != (b, s, h):
            raise ValueError(f"beta must be [b, s, h] = {[b, s, h]}, got "
                             f"{None if beta is None else list(beta.shape)}")
    elif beta is not None:
        raise ValueError("beta is a parameter of the gated delta rule, not of gated linear attention")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [b, h, dk, dv] = {[b, h, dk, v.shape[-1]]}, "
                         f"got {list(initial_state.shape)}")
    return kind


def check_gate_values(g: torch.Tensor | None, beta: torch.Tensor | None = None) -> None:
    """Raise ValueError unless every log gate is finite and <= 0 and every beta is in [0, 1] (host sync)."""
    if g is not None and not bool(((g <= 0) & torch.isfinite(g)).all()):
        raise ValueError(f"log gates must be finite and <= 0 (gates in (0, 1]), got max {g.max().item():.4g}, "
                         f"min {g.min().item():.4g}")
    if beta is not None and not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError(f"beta must be in [0, 1], got min {beta.min().item():.4g}, max {beta.max().item():.4g}")


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                           scale: float = 1.0, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False,
                           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal gated linear attention on the local device, through the selected backend.

    Args:
        q, k: `[b, s, h, dk]`.
        v: `[b, s, h, dv]`.
        g: log gate <= 0 (not checked here: see `check_gate_values`): `[h]`, `[b, s, h]`, `[b, s, h, dk]`,
            or None (no gate).
        scale: multiplies the output (1: lctrain's linear attention convention).
        initial_state: `[b, h, dk, dv]` entering state (float32; float64 with float64 inputs), or None.
        output_final_state: also return the state after the last token.
        backend: force a backend by name.
    Returns:
        `o` `[b, s, h, dv]` in v's dtype; the final state `[b, h, dk, dv]` (float32, float64 for float64
        inputs) or None.
    """
    check_gated_inputs(q, k, v, g, initial_state=initial_state)
    be = REGISTRY.select(q, k, v, g, None, backend=backend, describe=lambda: _describe(q, v))
    return be.fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


register_gla_backend("recurrent", gla_recurrent, priority=0, validated_on_gpu=True)
register_gla_backend("chunk", chunk_gla, priority=10, validated_on_gpu=True)
register_gla_backend("fla", fla_gla, supports=fla_supports_gla, priority=100, is_available=fla_available,
                     validated_on_gpu=True)
