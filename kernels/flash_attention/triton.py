"""Flash attention in Triton: tiled softmax attention returning the log-sum-exp, with a functional backward.

Forward: one program per (query block, batch x head) streams the key blocks with the online softmax
(running max and sum in float32) and writes o and lse = log sum_j exp(s_ij). Backward, from any
(o, lse) pair (the ring backward passes the final merged ones): delta_i = do_i . o_i; one kernel per
(key block, batch x kv head) accumulates dk and dv over every query head of its GQA group and every
query block (no atomics), another per (query block, batch x head) accumulates dq.
Causal masking is bottom-right aligned: query i sees key j when j <= i + (sk - sq); a row with no
visible key gets o = 0 and lse = -inf. Derivations: README.md beside this file.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lctrain.kernels.utils import check_dtype, check_runnable, dot_precision, new_output, pow2, triton_kernel

def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Hopper-oriented candidates (BLOCK_M, BLOCK_N, warps, stages): wide query blocks forward; for dk/dv
# narrow query blocks against a wide resident key block, for dq the other way round.
_FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3),
                         (64, 128, 4, 3)])
_DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                          (32, 64, 4, 2)])
_DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3),
                        (64, 32, 4, 2)])
_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16}


@triton_kernel(configs=_FWD_CONFIGS, key=["D", "CAUSAL"], interpret=_INTERPRET)
def _forward_kernel(Q, K, V, O, LSE, scale, SQ, SK, H, GROUP, D,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // H
    i_h = pid_bh % H
    i_hk = i_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SQ
    mask_d = offs_d < D

    q_ptrs = Q + i_b * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + i_b * stride_kb + i_hk * stride_kh
    v_base = V + i_b * stride_vb + i_hk * stride_vh
    qk_scale = scale * 1.4426950408889634  # work in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    shift = SK - SQ
    hi = SK
    full_until = SK  # key blocks ending here or before need no mask
    if CAUSAL:
        hi = tl.maximum(tl.minimum(SK, (pid_m + 1) * BLOCK_M + shift), 0)
        full_until = tl.minimum(SK, pid_m * BLOCK_M + shift + 1)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < SK
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        if start_n + BLOCK_N > full_until:
            visible = mask_n[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = O + i_b * stride_ob + i_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + pid_bh * SQ + offs_m, lse, mask=mask_m)


@triton_kernel(configs=_DKDV_CONFIGS, key=["D", "CAUSAL"], interpret=_INTERPRET)
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, SQ, SK, H, HKV, GROUP, D,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                          CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dv_j = sum_i p_ij do_i;  dk_j = scale * sum_i p_ij (do_i . v_j - delta_i) q_i, over the group's q heads.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // HKV
    i_hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < SK
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + i_b * stride_kb + i_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + i_b * stride_vb + i_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    shift = SK - SQ
    lo = 0
    full_from = 0  # query blocks starting here or after see every key of this block
    if CAUSAL:
        # the first query that sees this block's first key, rounded down to a query block
        lo = (tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
        full_from = pid_n * BLOCK_N + BLOCK_N - 1 - shift
    key_tail = pid_n * BLOCK_N + BLOCK_N > SK
    for g in range(0, GROUP):
        i_h = i_hk * GROUP + g
        q_base = Q + i_b * stride_qb + i_h * stride_qh
        do_base = DO + i_b * stride_dob + i_h * stride_doh
        row_base = (i_b * H + i_h) * SQ
        for start_m in range(lo, SQ, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < SQ
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :],
                         mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=mask_m, other=float("inf"))
            # a row with no visible key (lse = -inf) gets p = 0, not exp(-inf + inf)
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + rows, mask=mask_m, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            p = tl.exp2(s - lse[:, None])
            if key_tail | (start_m < full_from):
                visible = mask_n[None, :] & mask_m[:, None]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= rows[:, None] + shift)
                p = tl.where(visible, p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk_ptrs = DK + i_b * stride_kb + i_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    dv_ptrs = DV + i_b * stride_vb + i_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton_kernel(configs=_DQ_CONFIGS, key=["D", "CAUSAL"], interpret=_INTERPRET)
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, SQ, SK, H, GROUP, D,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                        CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dq_i = scale * sum_j p_ij (do_i . v_j - delta_i) k_j
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // H
    i_h = pid_bh % H
    i_hk = i_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < SQ
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q_offs = i_b * stride_qb + i_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + i_b * stride_dob + i_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * SQ + offs_m, mask=mask_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * SQ + offs_m, mask=mask_m, other=0.0)
    k_base = K + i_b * stride_kb + i_hk * stride_kh
    v_base = V + i_b * stride_vb + i_hk * stride_vh
    qk_scale = scale * 1.4426950408889634
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    shift = SK - SQ
    hi = SK
    full_until = SK  # key blocks ending here or before need no mask
    if CAUSAL:
        hi = tl.maximum(tl.minimum(SK, (pid_m + 1) * BLOCK_M + shift), 0)
        full_until = tl.minimum(SK, pid_m * BLOCK_M + shift + 1)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < SK
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s - lse[:, None])
        if start_n + BLOCK_N > full_until:
            visible = mask_n[None, :] & mask_m[:, None]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [b, sq, h, d] and k, v [b, sk, h_kv, d]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k/v must agree in batch and head dim; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dtype(q)
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    check_runnable(q, k, v)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_inner_contiguous(x) for x in (q, k, v))
    batch, sq, heads, d = q.shape
    sk, heads_kv = k.shape[1], k.shape[2]
    o = new_output(q.shape, q.dtype, q.device)  # [b, sq, h, d]
    lse = new_output((batch, heads, sq), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _forward_kernel[grid](q, k, v, o, lse, scale, sq, sk, heads, heads // heads_kv, d,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                          CAUSAL=causal, PRECISION=dot_precision(q.dtype), BLOCK_D=pow2(d))
    return o, lse


def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, causal: bool, scale: float, d_lse: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # dq, dk, dv are written with the strides of q, k, v: make all four plainly contiguous
    do, q, k, v = (x.contiguous() for x in (do, q, k, v))
    batch, sq, heads, d = q.shape
    sk, heads_kv = k.shape[1], k.shape[2]
    # delta_i = do_i . o_i; a gradient flowing into lse_i enters as -d_lse_i (d lse_i / d s_ij = p_ij)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2)  # [b, h, sq]
    if d_lse is not None:
        delta = delta - d_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    precision = dot_precision(q.dtype)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    grid_kv = lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), batch * heads_kv)  # noqa: E731
    _backward_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, scale, sq, sk, heads, heads_kv,
                                   heads // heads_kv, d, *strides,
                                   CAUSAL=causal, PRECISION=precision, BLOCK_D=pow2(d))
    grid_q = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _backward_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, scale, sq, sk, heads, heads // heads_kv, d,
                                *strides, CAUSAL=causal, PRECISION=precision, BLOCK_D=pow2(d))
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: (o, lse) forward, Triton backward (a gradient of lse is honoured too)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o, lse

    @staticmethod
    def backward(ctx, do, d_lse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, d_lse)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with log-sum-exp (Triton), differentiable in q, k, v (through o and lse).

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).

    Args:
        q: [b, sq, h, d]; k, v: [b, sk, h_kv, d] with h % h_kv == 0 (GQA); one floating dtype.
        causal: query i sees key j when j <= i + (sk - sq) (bottom-right aligned, as flash-attn).
        softmax_scale: multiplies q . k; None means 1 / sqrt(d).

    Returns:
        o [b, sq, h, d] in q's dtype (0 on rows with no visible key) and lse [b, h, sq] float32
        (natural log; -inf on rows with no visible key).
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return FlashAttentionFunction.apply(q, k, v, causal, scale)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                            softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_attention` without autograd: (o, lse) for callers that run `flash_attention_backward` themselves.

    Args and Returns: as `flash_attention`.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    with torch.no_grad():
        return _forward(q, k, v, causal, scale)


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             o: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                             softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of softmax attention from an (o, lse) pair, e.g. the merged result of a ring of partial calls.

    Args:
        do: [b, sq, h, d], the gradient of o.
        q, k, v: as in `flash_attention`.
        o, lse: the attention output [b, sq, h, d] and its log-sum-exp [b, h, sq] over ALL keys the
            caller attends to (not only k, v): p_ij = exp(s_ij - lse_i), delta_i = do_i . o_i.
        causal, softmax_scale: as in `flash_attention`.

    Returns:
        dq [b, sq, h, d], dk and dv [b, sk, h_kv, d] (summed over each kv head's query heads).
    """
    _check(q, k, v)
    if do.shape != q.shape or o.shape != q.shape:
        raise ValueError(f"do and o must have q's shape {tuple(q.shape)}; got {tuple(do.shape)}, {tuple(o.shape)}")
    if lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"lse must have shape [b, h, sq] = {[q.shape[0], q.shape[2], q.shape[1]]}; "
                         f"got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _backward(do, q, k, v, o, lse, causal, scale)
