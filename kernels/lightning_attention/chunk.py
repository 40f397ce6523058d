"""Lightning Attention-2 in Triton: causal linear attention with per-head decay, tiled over the sequence.

Each program walks its sequence block by block and keeps the running state in float32 registers:
inside a block, ordinary masked attention with the decay matrix lambda^(i-j); across blocks, the
kernel trick (the state S = sum lambda^(.) k^T v), so the cost is linear in the sequence length and
there is no cumsum. The backward is hand-written: dq is the forward recurrence on (do, v, k) with the
transposed initial state; dk and dv run the same recurrence backwards in time on the state gradient,
which ends as d initial_state. The gradient of log_decay follows from dq and dk in closed form.
Derivations: README.md beside this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lctrain.kernels.utils import check_dtype, check_runnable, dot_precision, new_output, pow2, triton_kernel

_CONFIGS = [triton.Config({"BLOCK": block, "BLOCK_C": block_c}, num_warps=warps, num_stages=stages)
            for block in (64, 128) for block_c in (64, 128) for warps in (4, 8) for stages in (2, 3)]
_INTERPRET = {"BLOCK": 16, "BLOCK_C": 16}


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET)
def _forward_kernel(A, B, C, LOG_DECAY, X0, OUT, XN, T, H, DA, DC,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # out_i = sum_{j<=i} lambda^(i-j) (a_i . b_j) c_j + lambda^(i+1) a_i X  (X: state before the block)
    # X    <- lambda^n X + sum_j lambda^(n-1-j) b_j^T c_j                   (n: valid rows of the block)
    # a, b: [B, T, H, DA], c and out: [B, T, H, DC] (contiguous); X: [B, H, DA, DC] float32.
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // H
    i_h = pid_bh % H
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)

    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_a = offs_a < DA
    mask_c = offs_c < DC
    diff = offs_t[:, None] - offs_t[None, :]
    intra_decay = tl.where(diff >= 0, tl.exp(gamma * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    row_decay = tl.exp(gamma * (offs_t + 1).to(tl.float32))

    x_offs = i_b * stride_xb + i_h * stride_xh + offs_a[:, None] * stride_xa + offs_c[None, :] * stride_xc
    x_mask = mask_a[:, None] & mask_c[None, :]
    if HAS_X0:
        x = tl.load(X0 + x_offs, mask=x_mask, other=0.0).to(tl.float32)
    else:
        x = tl.full([BLOCK_A, BLOCK_C], 0.0, dtype=tl.float32)

    a_base = A + i_b * T * H * DA + i_h * DA
    b_base = B + i_b * T * H * DA + i_h * DA
    c_base = C + i_b * T * H * DC + i_h * DC
    o_base = OUT + i_b * T * H * DC + i_h * DC
    for start in range(0, T, BLOCK):
        rows = start + offs_t
        mask_t = rows < T
        n_valid = tl.minimum(T - start, BLOCK)
        a_ptrs = rows[:, None] * H * DA + offs_a[None, :]
        c_ptrs = rows[:, None] * H * DC + offs_c[None, :]
        a = tl.load(a_base + a_ptrs, mask=mask_t[:, None] & mask_a[None, :], other=0.0)  # [BLOCK, BLOCK_A]
        b = tl.load(b_base + a_ptrs, mask=mask_t[:, None] & mask_a[None, :], other=0.0)  # [BLOCK, BLOCK_A]
        c = tl.load(c_base + c_ptrs, mask=mask_t[:, None] & mask_c[None, :], other=0.0)  # [BLOCK, BLOCK_C]

        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION) * intra_decay  # [BLOCK, BLOCK]
        out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
        out += tl.dot(a, x.to(a.dtype), input_precision=PRECISION) * row_decay[:, None]  # [BLOCK, BLOCK_C]
        tl.store(o_base + c_ptrs, out.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])

        b_decay = tl.where(mask_t, tl.exp(gamma * tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32)), 0.0)
        b_decayed = (b * b_decay[:, None]).to(b.dtype)
        x = x * tl.exp(gamma * n_valid.to(tl.float32))
        x += tl.dot(tl.trans(b_decayed), c, input_precision=PRECISION)  # [BLOCK_A, BLOCK_C]

    if STORE_XN:
        xn_offs = pid_bh * DA * DC + offs_a[:, None] * DC + offs_c[None, :]
        tl.store(XN + xn_offs, x, mask=x_mask)


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET)
def _reverse_kernel(A, B, C, LOG_DECAY, X0, OUT, XN, T, H, DA, DC,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # The same recurrence backwards in time (blocks from last to first; only the last may be partial):
    # out_j = sum_{i>=j} lambda^(i-j) (a_j . b_i) c_i + lambda^(n-1-j) a_j X  (X: state after the block)
    # X    <- lambda^n X + sum_i lambda^(i+1) b_i^T c_i
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // H
    i_h = pid_bh % H
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)

    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_a = offs_a < DA
    mask_c = offs_c < DC
    diff = offs_t[None, :] - offs_t[:, None]
    intra_decay = tl.where(diff >= 0, tl.exp(gamma * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    col_decay = tl.exp(gamma * (offs_t + 1).to(tl.float32))

    x_offs = i_b * stride_xb + i_h * stride_xh + offs_a[:, None] * stride_xa + offs_c[None, :] * stride_xc
    x_mask = mask_a[:, None] & mask_c[None, :]
    if HAS_X0:
        x = tl.load(X0 + x_offs, mask=x_mask, other=0.0).to(tl.float32)
    else:
        x = tl.full([BLOCK_A, BLOCK_C], 0.0, dtype=tl.float32)

    a_base = A + i_b * T * H * DA + i_h * DA
    b_base = B + i_b * T * H * DA + i_h * DA
    c_base = C + i_b * T * H * DC + i_h * DC
    o_base = OUT + i_b * T * H * DC + i_h * DC
    num_blocks = (T + BLOCK - 1) // BLOCK
    for r in range(0, num_blocks):
        start = (num_blocks - 1 - r) * BLOCK
        rows = start + offs_t
        mask_t = rows < T
        n_valid = tl.minimum(T - start, BLOCK)
        a_ptrs = rows[:, None] * H * DA + offs_a[None, :]
        c_ptrs = rows[:, None] * H * DC + offs_c[None, :]
        a = tl.load(a_base + a_ptrs, mask=mask_t[:, None] & mask_a[None, :], other=0.0)  # [BLOCK, BLOCK_A]
        b = tl.load(b_base + a_ptrs, mask=mask_t[:, None] & mask_a[None, :], other=0.0)  # [BLOCK, BLOCK_A]
        c = tl.load(c_base + c_ptrs, mask=mask_t[:, None] & mask_c[None, :], other=0.0)  # [BLOCK, BLOCK_C]

        a_decay = tl.where(mask_t, tl.exp(gamma * tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32)), 0.0)
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION) * intra_decay  # [BLOCK, BLOCK]
        out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
        out += tl.dot(a, x.to(a.dtype), input_precision=PRECISION) * a_decay[:, None]  # [BLOCK, BLOCK_C]
        tl.store(o_base + c_ptrs, out.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])

        b_decayed = (b * col_decay[:, None]).to(b.dtype)
        x = x * tl.exp(gamma * n_valid.to(tl.float32))
        x += tl.dot(tl.trans(b_decayed), c, input_precision=PRECISION)  # [BLOCK_A, BLOCK_C]

    if STORE_XN:
        xn_offs = pid_bh * DA * DC + offs_a[:, None] * DC + offs_c[None, :]
        tl.store(XN + xn_offs, x, mask=x_mask)


def _launch(kernel, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, log_decay: torch.Tensor,
            x0: torch.Tensor | None, out_dtype: torch.dtype, store_xn: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one recurrence: out [B, T, H, DC] in out_dtype, and the last state [B, H, DA, DC] float32 if asked."""
    batch, seq, heads, da = a.shape
    dc = c.shape[-1]
    out = new_output((batch, seq, heads, dc), out_dtype, a.device)
    xn = new_output((batch, heads, da, dc), torch.float32, a.device) if store_xn else None
    x_strides = x0.stride() if x0 is not None else (0, 0, 0, 0)
    grid = lambda meta: (triton.cdiv(dc, meta["BLOCK_C"]), batch * heads)  # noqa: E731
    kernel[grid](a, b, c, log_decay, x0 if x0 is not None else out, out, xn if xn is not None else out,
                 seq, heads, da, dc, *x_strides,
                 HAS_X0=x0 is not None, STORE_XN=store_xn, PRECISION=dot_precision(a.dtype), BLOCK_A=pow2(da))
    return out, xn


class LightningAttentionFunction(torch.autograd.Function):
    """Lightning attention with the hand-written Triton backward (dq, dk, dv, d initial_state, d log_decay)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, output_final_state):
        o, final = _launch(_forward_kernel, q, k, v, log_decay, initial_state, v.dtype, output_final_state)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, final)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, log_decay, initial_state, final = ctx.saved_tensors
        do = do.contiguous()
        d_final = d_final.contiguous() if d_final is not None else None
        need_q, need_k, need_v, need_decay, need_s0 = ctx.needs_input_grad[:5]
        dq = dk = dv = d_s0 = None
        if need_q or need_decay:
            # dq_i = sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S0^T: the forward on (do, v, k)
            s0_t = initial_state.transpose(-1, -2) if initial_state is not None else None  # [b, h, dv, dk]
            dq, _ = _launch(_forward_kernel, do, v, k, log_decay, s0_t, q.dtype, False)
        # dv_j = k_j D_j, dk_j = D_j v_j^T with D_j = sum_{i>=j} lambda^(i-j) q_i^T do_i + lambda^(n-1-j) dFinal
        if need_v or need_s0:
            dv, d_s0 = _launch(_reverse_kernel, k, q, do, log_decay, d_final, v.dtype,
                               initial_state is not None and need_s0)
        if need_k or need_decay:
            d_final_t = d_final.transpose(-1, -2) if d_final is not None else None
            dk, _ = _launch(_reverse_kernel, v, do, q, log_decay, d_final_t, k.dtype, False)
        d_log_decay = None
        if need_decay:
            d_log_decay = _log_decay_grad(q, k, dq, dk, final, d_final)
        return dq, dk, dv, d_log_decay, d_s0, None


def _log_decay_grad(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                    final: torch.Tensor | None, d_final: torch.Tensor | None) -> torch.Tensor:
    """d log_decay [h]: sum_t (t+1) (q_t . dq_t - k_t . dk_t) + n <dFinal, final>, summed over the batch."""
    seq = q.shape[1]
    weight = torch.arange(1, seq + 1, device=q.device, dtype=torch.float32)  # [s]
    per_token = (q.float() * dq.float()).sum(-1) - (k.float() * dk.float()).sum(-1)  # [b, s, h]
    grad = (per_token * weight[None, :, None]).sum((0, 1))  # [h]
    if d_final is not None and final is not None:
        grad = grad + seq * (d_final.float() * final).sum((0, 2, 3))
    return grad


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay (Lightning Attention-2), Triton forward and backward.

        o_t   = q_t (lambda^(t+1) S0 + sum_{s<=t} lambda^(t-s) k_s^T v_s)
        final = lambda^n S0 + sum_{s<n} lambda^(n-1-s) k_s^T v_s

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    Differentiable in q, k, v, initial_state and log_decay.

    Args:
        q, k: [b, s, h, dk]; v: [b, s, h, dv]; one floating dtype (float32 accumulation inside).
        log_decay: [h], log(lambda) <= 0 per head; None means lambda = 1 (plain linear attention).
        initial_state: [b, h, dk, dv] state before the first token (float32); None means zeros.
        output_final_state: also return the state after the last token.

    Returns:
        o [b, s, h, dv] in v's dtype, and the final state [b, h, dk, dv] float32 (or None).
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [b, s, h, dk] and v [b, s, h, dv] with equal b, s, h; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dtype(q)
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    if log_decay is None:
        log_decay = torch.zeros(heads, dtype=torch.float32, device=q.device)
    elif log_decay.shape != (heads,):
        raise ValueError(f"log_decay must have shape [h] = [{heads}]; got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (batch, heads, dk, dv):
        raise ValueError(f"initial_state must have shape [b, h, dk, dv] = {[batch, heads, dk, dv]}; "
                         f"got {tuple(initial_state.shape)}")
    tensors = [q, k, v, log_decay] + ([initial_state] if initial_state is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(t.device) for t in tensors})}")
    check_runnable(*tensors)
    if initial_state is not None:
        initial_state = initial_state.float()
    return LightningAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                            log_decay.float().contiguous(), initial_state, output_final_state)
