"""Causal linear attention with per-head decay: backend dispatch and the chunked PyTorch backend.

    o_t   = q_t . (lambda^(t+1) S0 + sum_{s<=t} lambda^(t-s) k_s^T v_s)
    final = lambda^n S0 + sum_s lambda^(n-1-s) k_s^T v_s

`linear_attention(...)` picks a backend per call: the one named by `backend=`, else the one forced by
`use_linear_attention_backend(name)`, else env LCTRAIN_LINEAR_BACKEND, else the highest-priority registered
backend whose `supports(q, k, v, log_decay)` accepts the inputs. Built in: "reference" (the naive O(N^2)
definition, linear_attention_ref.py) and "chunk" (below). A kernel module adds itself with one call:

    register_linear_attention_backend("triton", lightning_attention, supports=..., priority=100)

and is loaded on first dispatch if `lctrain.kernels.lightning_attention` exists.

The "chunk" backend is the lightning-attention split in plain PyTorch: the sequence is cut into chunks of
`CHUNK_SIZE` tokens; inside a chunk, masked attention with the decay matrix; across chunks, the state
recurrence S_{c+1} = lambda^L_c S_c + M_c. Matmuls in the input dtype, decays and states in float32 (float64
for float64 inputs; `lctrain.ops.precision`); any length (the last
chunk may be short); gradients through autograd. It keeps for backward only its inputs (q, k, v, decay, initial
state) and recomputes the intra-chunk terms there (`lctrain.ops.chunk_recompute`, fla's memory model). The
derivation is in lctrain/sp/README_lasp2.md.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from lctrain.ops.chunk_recompute import lean_apply
from lctrain.ops.debug import debug_checks_enabled, log_decay_problem
from lctrain.ops.linear_attention_ref import compute_dtype, linear_attention_ref
from lctrain.ops.registry import BackendRegistry, always

#: Tokens per chunk of the "chunk" backend.
CHUNK_SIZE = 64

LinearAttentionFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


def default_log_decay(num_heads: int, layer_idx: int | None = None, num_layers: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head log-decay of lightning attention (TransNormerLLM, MiniMax-01): minus the ALiBi slopes.

    For H a power of two, head h (0-indexed) gets lambda_h = exp(-2^(-8 (h+1) / H)), i.e.
    log_decay[h] = -2^(-8 (h+1) / H): head 0 forgets fastest (lambda = exp(-2^(-8/H)), exp(-1/2) for H = 8),
    the last head slowest (lambda = exp(-2^-8) = 0.9961). Other H follow ALiBi's rule: the slopes of the
    nearest power of two below H, then every other slope of twice that. With `layer_idx` and `num_layers`, the
    slopes are scaled by TransNormerLLM's depth factor (1 - layer_idx / (num_layers - 1) + 1e-5), so deeper
    layers decay less.

    Args:
        num_heads: H.
        layer_idx, num_layers: optional depth scaling (both or neither).
        device: where to put the result.
    Returns:
        float32 `[H]`, every entry < 0.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("give both layer_idx and num_layers, or neither")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        base = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(base) + power_of_two(2 * base)[0::2][: num_heads - base]
    scale = 1.0
    if num_layers is not None:
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for {num_layers} layers")
        scale = (1.0 - layer_idx / max(num_layers - 1, 1)) + 1e-5
    return -torch.tensor(slopes, dtype=torch.float32, device=device) * scale


def _chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                            initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    c = chunk_size or CHUNK_SIZE
    nc = max(1, -(-n // c))
    pad = nc * c - n

    idt = q.dtype  # matmul operands stay in the input dtype (lctrain.ops.precision); gates and states in cdt

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # [b, h, n, d]
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(b, h, nc, c, x.shape[-1])  # [b, h, nc, c, d]

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    i = torch.arange(c, device=q.device)
    lengths = (n - torch.arange(nc, device=q.device) * c).clamp(max=c)  # real tokens per chunk, [nc]
    dist = (i[:, None] - i[None, :]).to(cdt)  # [c, c]
    causal = dist >= 0
    # Steps from each token to the end of its chunk; negative only for padding (masked out).
    to_end = (lengths[:, None] - 1 - i[None, :]).to(cdt)  # [nc, c]
    valid = to_end >= 0
    if log_decay is None:
        intra = causal.to(cdt)  # [c, c]
        q_dec = qc
        k_dec = kc * valid.to(idt)[:, :, None]
        chunk_dec = None
    else:
        ld = log_decay.to(cdt)[:, None, None]  # [h, 1, 1]
        # Exponents are clamped before exp so masked entries stay finite (no inf * 0 in gradients).
        intra = (torch.exp(ld * dist.clamp_min(0)) * causal)[:, None]  # [h, 1, c, c]
        q_dec = (qc.to(cdt) * torch.exp(ld * (i + 1).to(cdt)[:, None])[:, None]).to(idt)  # [b, h, nc, c, dk]
        k_w = torch.exp(ld * to_end.clamp_min(0)) * valid  # [h, nc, c], lambda^(steps to the chunk's end)
        k_dec = (kc.to(cdt) * k_w[..., None]).to(idt)  # [b, h, nc, c, dk]
        chunk_dec = torch.exp(log_decay.to(cdt)[:, None] * lengths.to(cdt)[None, :])  # [h, nc]

    scores = ((qc @ kc.transpose(-1, -2)).to(cdt) * intra).to(idt)  # decayed in cdt, rounded for the product
    o = (scores @ vc).to(cdt)  # [b, h, nc, c, dv]
    mem = (k_dec.transpose(-1, -2) @ vc).to(cdt)  # [b, h, nc, dk, dv], each chunk's own contribution to the state

    if initial_state is not None:
        state = initial_state.to(cdt)
    else:
        state = torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device)
    if nc == 1 and initial_state is None:
        entering = None
    else:
        states = []
        # unbind, not indexing per chunk: one backward node instead of a full-size gradient per chunk.
        mems = mem.unbind(2)
        decays = [1.0] * nc if chunk_dec is None else chunk_dec[:, :, None, None].unbind(1)  # [h, 1, 1] each
        for mem_j, decay_j in zip(mems, decays):
            states.append(state)
            state = decay_j * state + mem_j
        entering = torch.stack(states, dim=2)  # [b, h, nc, dk, dv], the state entering each chunk
    if entering is not None:
        o = o + (q_dec @ entering.to(idt)).to(cdt)
    if nc == 1 and initial_state is None and output_final_state:
        state = mem[:, :, 0]
    o = o.reshape(b, h, nc * c, dv)[:, :, :n].transpose(1, 2)  # [b, n, h, dv]
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                           chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "chunk" backend: `_chunk_linear_attention` keeping only its inputs for backward (recomputed there)."""
    return lean_apply(lambda q, k, v, ld, s0: _chunk_linear_attention(q, k, v, ld, s0, output_final_state, chunk_size),
                      (q, k, v, log_decay, initial_state))


def memory_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None) -> torch.Tensor:
    """The state a sequence leaves behind from a zero start: M = sum_s lambda^(n-1-s) k_s^T v_s (one matmul).

    Args:
        k: `[b, n, h, dk]`.
        v: `[b, n, h, dv]`.
        log_decay: `[h]` or None.
    Returns:
        `[b, h, dk, dv]` in float32 (float64 for float64 inputs); differentiable.
    """
    cdt = compute_dtype(k.dtype)
    kf = k
    if log_decay is not None:
        n = k.shape[1]
        to_end = torch.arange(n - 1, -1, -1, device=k.device, dtype=cdt)  # [n], n-1-s
        kf = (k.to(cdt) * torch.exp(to_end[:, None] * log_decay.to(cdt)[None, :])[..., None]).to(k.dtype)
    return torch.einsum("bshk,bshv->bhkv", kf, v).to(cdt)  # input-dtype operands, float32 state


@dataclass(frozen=True)
class LinearAttentionBackend:
    """One local linear-attention implementation."""

    name: str
    """Name used to force it (`backend=`, `use_linear_attention_backend`, LCTRAIN_LINEAR_BACKEND)."""
    fn: LinearAttentionFn
    """(q, k, v, log_decay=None, initial_state=None, output_final_state=False) -> (o, final_state)."""
    supports: Callable[..., bool]
    """(q, k, v, log_decay) -> whether automatic dispatch may pick it for these inputs."""
    priority: int
    """Higher wins when several support a case ("chunk" is 10)."""
    validated_on_gpu: bool = False
    """Whether it has run and passed its tests on a GPU; on CUDA tensors automatic dispatch prefers validated
    backends (lctrain.ops.registry)."""

    def available(self) -> bool:
        return True


#: The registered backends; the Triton kernel's package registers itself when loaded on first dispatch.
REGISTRY: BackendRegistry[LinearAttentionBackend] = BackendRegistry(
    "linear attention", "LCTRAIN_LINEAR_BACKEND", plugins=("lctrain.kernels.lightning_attention",))


def register_linear_attention_backend(name: str, fn: LinearAttentionFn,
                                      supports: Callable[..., bool] | None = None, priority: int = 0,
                                      validated_on_gpu: bool = False) -> None:
    """Register (or replace) a local linear-attention backend.

    Args:
        name: the name `backend=` / `use_linear_attention_backend` / LCTRAIN_LINEAR_BACKEND select it by.
        fn: `fn(q, k, v, log_decay=None, initial_state=None, output_final_state=False) -> (o, final_state)`,
            differentiable in q, k, v, initial_state (and log_decay when it requires grad).
        supports: `supports(q, k, v, log_decay) -> bool`, whether automatic dispatch may pick it for these
            inputs (default: always). A forced backend is used without asking.
        priority: automatic dispatch takes the highest-priority supporting backend ("chunk" is 10).
        validated_on_gpu: whether it has run and passed its tests on a GPU (on CUDA, automatic dispatch
            prefers validated backends over higher-priority unvalidated ones).
    """
    REGISTRY.register(LinearAttentionBackend(name, fn, supports or always, priority, validated_on_gpu))


def linear_attention_backends() -> list[str]:
    """Registered backend names, highest priority first."""
    return list(REGISTRY.backends())


def use_linear_attention_backend(name: str | None) -> contextlib.AbstractContextManager[None]:
    """Force backend `name` for every `linear_attention` call in this thread inside the block (None: automatic)."""
    return REGISTRY.use(name)


def select_linear_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    log_decay: torch.Tensor | None = None, backend: str | None = None) -> str:
    """The backend name `linear_attention` would use for these inputs."""
    return _select(q, k, v, log_decay, backend).name


def _select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
            backend: str | None) -> LinearAttentionBackend:
    return REGISTRY.select(q, k, v, log_decay, backend=backend,
                           describe=lambda: f"q {tuple(q.shape)} {q.dtype} on {q.device}, v {tuple(v.shape)}")


def check_linear_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  log_decay: torch.Tensor | None = None,
                                  initial_state: torch.Tensor | None = None) -> None:
    """Raise ValueError when shapes are not what `linear_attention` accepts (host metadata only).

    Whether the decay values are <= 0 is checked only with debug checks on (`lctrain.ops.debug`): that check
    synchronises the device. Check a decay parameter once with `lctrain.ops.debug.check_log_decay`.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [b, s, h, dk] with the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [b, s, h, dv] matching q's {tuple(q.shape[:3])} in b, s, h; got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, h, dk = q.shape
    if log_decay is not None:
        if log_decay.shape != (h,):
            raise ValueError(f"log_decay must be [heads] = [{h}], got {tuple(log_decay.shape)}")
        # A value check reads the device: only under the debug switch (lctrain.ops.debug), never per call.
        problem = log_decay_problem(log_decay) if debug_checks_enabled() else None
        if problem:
            raise ValueError(problem)
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [b, h, dk, dv] = {(b, h, dk, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                     backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay on the local device, through the selected backend.

    Args:
        q, k: `[b, s, h, dk]`.
        v: `[b, s, h, dv]`.
        log_decay: `[h]`, log(lambda) <= 0; None means lambda = 1 (plain linear attention).
        initial_state: `[b, h, dk, dv]` state entering the sequence (float32; float64 with float64 inputs).
        output_final_state: also return the state after the last token.
        backend: force a backend by name (see module docstring for the default choice).
    Returns:
        `o` `[b, s, h, dv]` in v's dtype; the final state `[b, h, dk, dv]` (float32, or float64 for float64
        inputs) or None.
    """
    check_linear_attention_inputs(q, k, v, log_decay, initial_state)
    return _select(q, k, v, log_decay, backend).fn(q, k, v, log_decay=log_decay, initial_state=initial_state,
                              output_final_state=output_final_state)


# Plain PyTorch: the same code on every device.
register_linear_attention_backend("reference", linear_attention_ref, priority=0, validated_on_gpu=True)
register_linear_attention_backend("chunk", chunk_linear_attention, priority=10, validated_on_gpu=True)
