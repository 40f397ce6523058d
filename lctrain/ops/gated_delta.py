"""The gated delta rule: backend dispatch, chunked WY / UT-transform PyTorch form, chunk map.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          o_t = scale * S_t^T q_t

(a_t = exp(g_t), g `[b, s, h]` or `[h]`; definition: gated_delta_ref.py). `gated_delta_rule(...)` dispatches
like `gated_linear_attention`: "recurrent" (gated_delta_ref.py), "chunk" (below), "fla" (fla's
chunk_gated_delta_rule, CUDA only, imported lazily; gated_fla.py); env LCTRAIN_GATED_DELTA_BACKEND forces one.

The "chunk" form. Write the update as S_t = a_t S_{t-1} + k_t u_t^T with the new values
u_t = beta_t (v_t - a_t S_{t-1}^T k_t). In a chunk of C tokens with chunk-local cumulative log gates G (all
exponents below are differences <= 0) and entering state S:

    (I + A) U = diag(beta) V - diag(beta e^G) K S,   A_ij = beta_i e^(G_i - G_j) k_i.k_j  (j < i)

so with the UT transform (one unit-lower-triangular solve per chunk) W = (I + A)^-1 diag(beta e^G) K and
U0 = (I + A)^-1 diag(beta) V, the chunk's new values are U = U0 - W S and

    O     = scale * [ (Q e^G) S + P U ],            P_ij = e^(G_i - G_j) q_i.k_j  (j <= i)
    S_out = e^(G_last) S + Kd^T U,                   Kd_j = e^(G_last - G_j) k_j
          = (e^(G_last) I - Kd^T W) S + Kd^T U0      (the chunk's affine map T S + M, T a full dk x dk matrix)

Only the state recurrence between chunks is sequential. Matmuls in the input dtype; gates, states, the
triangular solves and the [dk, dk] map compositions in float32 (float64 for float64 inputs;
`lctrain.ops.precision`), backward
by autograd of a graph rebuilt in backward: forward keeps only the inputs (`lctrain.ops.chunk_recompute`).
Derivation and its use across ranks: lctrain/sp/README_lasp2_gated.md.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lctrain.ops.chunk_recompute import lean_apply
from lctrain.ops.gated_delta_ref import gated_delta_rule_recurrent
from lctrain.ops.gated_fla import fla_available, fla_gated_delta_rule, fla_supports_delta
from lctrain.ops.gla import (GatedBackend, GatedFn, check_gated_inputs, from_chunks, scalar_log_gate,
                             segment_log_decay, to_chunks)
from lctrain.ops.linear_attention_ref import compute_dtype
from lctrain.ops.precision import fp32_by_design
from lctrain.ops.registry import BackendRegistry, always

#: Tokens per chunk of the "chunk" backend.
CHUNK_SIZE = 64


def _chunk_terms(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor, chunk: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-chunk quantities of the WY / UT form, `[b, h, nc, ...]` (padding tokens have k = v = beta = g = 0).

    Matmul operands in the input dtype, gates in `dtype`; the triangular solves run in `dtype` by design (a
    `[c, c]` unit-triangular system per chunk: no bf16 trsm) and w, u0, k_dec come back in the input dtype.
    """
    idt = k.dtype
    kc, vc = to_chunks(k, chunk, idt), to_chunks(v, chunk, idt)  # [b, h, nc, c, d]
    bc = to_chunks(beta[..., None], chunk, dtype)[..., 0]  # [b, h, nc, c]
    gc = to_chunks(scalar_log_gate(g, k, dtype)[..., None], chunk, dtype)[..., 0]  # [b, h, nc, c]
    G = gc.cumsum(3)  # chunk-local cumulative log gates
    g_last = G[..., -1]  # [b, h, nc]
    seg = segment_log_decay(gc)  # [b, h, nc, c, c], G_i - G_j for j <= i without cancellation
    decay = torch.exp(seg)
    eye = torch.eye(chunk, dtype=dtype, device=k.device)
    a = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)).to(dtype) * decay).tril(-1)  # strictly lower
    ut = eye + a  # unit lower triangular
    with fp32_by_design("gated delta rule: per-chunk unit-triangular solve (I + A)^-1 of [c, c]"):
        w = torch.linalg.solve_triangular(ut, (bc * torch.exp(G))[..., None] * kc.to(dtype), upper=False,
                                          unitriangular=True).to(idt)
        u0 = torch.linalg.solve_triangular(ut, bc[..., None] * vc.to(dtype), upper=False,
                                           unitriangular=True).to(idt)
    k_dec = (kc.to(dtype) * torch.exp(seg[..., -1, :])[..., None]).to(idt)  # [b, h, nc, c, dk], e^(G_last - G_j)
    return dict(kc=kc, G=G, g_last=g_last, decay=decay, w=w, u0=u0, k_dec=k_dec)


def _chunk_gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                       beta: torch.Tensor, scale: float = 1.0, initial_state: torch.Tensor | None = None,
                       output_final_state: bool = False,
                       chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    cdt = compute_dtype(q.dtype)
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size or CHUNK_SIZE
    t = _chunk_terms(k, v, g, beta, c, cdt)
    idt = q.dtype  # matmul operands in the input dtype, gates and states in cdt (lctrain.ops.precision)
    qc = to_chunks(q, c, idt)
    p = ((qc @ t["kc"].transpose(-1, -2)).to(cdt) * t["decay"]).to(idt)  # [b, h, nc, c, c]
    q_dec = (qc.to(cdt) * torch.exp(t["G"])[..., None]).to(idt)  # [b, h, nc, c, dk]

    state = (initial_state.to(cdt) if initial_state is not None
             else torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device))
    entering, values = [], []
    decays = torch.exp(t["g_last"])[..., None, None].unbind(2)  # [b, h, 1, 1] per chunk
    for w_j, u0_j, kd_j, dec_j in zip(t["w"].unbind(2), t["u0"].unbind(2), t["k_dec"].unbind(2), decays):
        u_j = (u0_j.to(cdt) - (w_j @ state.to(idt)).to(cdt)).to(idt)  # [b, h, c, dv], the chunk's new values
        entering.append(state)
        values.append(u_j)
        state = dec_j * state + (kd_j.transpose(-1, -2) @ u_j).to(cdt)
    o = ((q_dec @ torch.stack(entering, dim=2).to(idt)).to(cdt)
         + (p @ torch.stack(values, dim=2)).to(cdt))  # [b, h, nc, c, dv]
    o = from_chunks(o * scale, n)
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_gated_delta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                      scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "chunk" backend: `_chunk_gated_delta` keeping only its inputs for backward (recomputed there)."""
    return lean_apply(lambda q, k, v, g, beta, s0: _chunk_gated_delta(q, k, v, g, beta, scale, s0, output_final_state,
                                                                       chunk_size),
                      (q, k, v, g, beta, initial_state))


def gated_delta_chunk_map(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of a whole sequence on the state: S_out = T S_in + M, T a full `[dk, dk]` per head.

    Composed chunk by chunk from the per-chunk maps T_c = e^(G_last) I - Kd^T W, M_c = Kd^T U0
    (T <- T_c T, M <- T_c M + M_c), in float32 (float64 for float64 inputs), differentiable.

    Args:
        k: `[b, s, h, dk]`; v: `[b, s, h, dv]`; g: `[b, s, h]`, `[h]` or None; beta: `[b, s, h]`.
    Returns:
        T `[b, h, dk, dk]`, M `[b, h, dk, dv]`.
    """
    cdt = compute_dtype(k.dtype)
    b, _, h, dk = k.shape
    t = _chunk_terms(k, v, g, beta, chunk_size or CHUNK_SIZE, cdt)
    eye = torch.eye(dk, dtype=cdt, device=k.device)
    tmap = eye.expand(b, h, dk, dk)
    mmap = torch.zeros(b, h, dk, v.shape[-1], dtype=cdt, device=k.device)
    decays = torch.exp(t["g_last"])[..., None, None].unbind(2)
    for w_j, u0_j, kd_j, dec_j in zip(t["w"].unbind(2), t["u0"].unbind(2), t["k_dec"].unbind(2), decays):
        kd_t = kd_j.transpose(-1, -2)  # [b, h, dk, c]
        with fp32_by_design("gated delta rule: composing [dk, dk] chunk maps (no sequence dimension)"):
            t_j = dec_j * eye - (kd_t @ w_j).to(cdt)  # [b, h, dk, dk]
            tmap = t_j @ tmap
            mmap = t_j @ mmap
        mmap = mmap + (kd_t @ u0_j).to(cdt)
    return tmap, mmap


#: The registered backends.
REGISTRY: BackendRegistry[GatedBackend] = BackendRegistry("gated delta rule", "LCTRAIN_GATED_DELTA_BACKEND")


def register_gated_delta_backend(name: str, fn: GatedFn, supports: Callable[..., bool] | None = None,
                                 priority: int = 0, is_available: Callable[[], bool] | None = None,
                                 validated_on_gpu: bool = False) -> None:
    """Register (or replace) a gated-delta-rule backend.

    Args:
        name: the name `backend=` / `use_gated_delta_backend` / LCTRAIN_GATED_DELTA_BACKEND select it by.
        fn: `fn(q, k, v, g, beta, scale=1.0, initial_state=None, output_final_state=False) -> (o, final)`.
        supports: `supports(q, k, v, g, beta) -> bool` for automatic dispatch (default: always).
        priority: automatic dispatch takes the highest-priority supporting backend ("chunk" is 10).
        is_available: whether it can run in this process (default: always).
        validated_on_gpu: whether it has run and passed its tests on a GPU.
    """
    REGISTRY.register(GatedBackend(name, fn, supports or always, priority, is_available or (lambda: True),
                                   validated_on_gpu))


def use_gated_delta_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force backend `name` for every `gated_delta_rule` call in this thread inside the block."""
    return REGISTRY.use(name)


def select_gated_delta_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                               beta: torch.Tensor, backend: str | None = None) -> str:
    """The backend name `gated_delta_rule` would use for these inputs."""
    return REGISTRY.select(q, k, v, g, beta, backend=backend, describe=lambda: f"q {tuple(q.shape)} {q.dtype} "
                           f"on {q.device}").name


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                     scale: float = 1.0, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule on the local device, through the selected backend.

    Args:
        q, k: `[b, s, h, dk]` (normally L2-normalised by the caller).
        v: `[b, s, h, dv]`.
        g: log gate <= 0, `[b, s, h]` or `[h]`, or None (no decay). Values are not checked here (no host
            sync): see `lctrain.ops.gla.check_gate_values`.
        beta: `[b, s, h]` write strengths in [0, 1].
        scale: multiplies the output.
        initial_state: `[b, h, dk, dv]` entering state (float32; float64 with float64 inputs), or None.
        output_final_state: also return the state after the last token.
        backend: force a backend by name.
    Returns:
        `o` `[b, s, h, dv]` in v's dtype; the final state `[b, h, dk, dv]` (float32, float64 for float64
        inputs) or None.
    """
    check_gated_inputs(q, k, v, g, beta, initial_state, delta=True)
    be = REGISTRY.select(q, k, v, g, beta, backend=backend,
                         describe=lambda: f"q {tuple(q.shape)} {q.dtype} on {q.device}")
    return be.fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


register_gated_delta_backend("recurrent", gated_delta_rule_recurrent, priority=0, validated_on_gpu=True)
register_gated_delta_backend("chunk", chunk_gated_delta, priority=10, validated_on_gpu=True)
register_gated_delta_backend("fla", fla_gated_delta_rule, supports=fla_supports_delta, priority=100,
                             is_available=fla_available, validated_on_gpu=True)
