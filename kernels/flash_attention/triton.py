"""Flash attention in Triton: tiled softmax attention returning the log-sum-exp, with a functional backward.

Forward: one program per (query block, batch x head) streams the key blocks with the online softmax
(running max and sum in float32) and writes o and lse = log sum_j exp(s_ij). Backward, from any
(o, lse) pair (the ring backward passes the final merged ones): delta_i = do_i . o_i; one kernel per
(key block, batch x kv head) accumulates dk and dv over every query head of its GQA group and every
query block (no atomics), another per (query block, batch x head) accumulates dq.
Causal masking is bottom-right aligned: query i sees key j when j <= i + (sk - sq); a row with no
visible key gets o = 0 and lse = -inf. Derivations: README.md beside this file.

The launchers are torch custom ops (`lctrain::flash_attention_fwd`, `lctrain::flash_attention_bwd`) with fake
kernels and the backward registered as the forward's autograd formula, so meta and fake tensors (the rehearsal,
the planner) and torch.compile pass through them; the real kernels run on CUDA or under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lctrain.kernels.utils import (check_dtype, check_row_stride, check_runnable, dot_precision, head_ptr, load_rows,
                                  new_output, pow2, row_block_ptrs, store_rows, triton_helper, triton_kernel)


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Hopper candidates (BLOCK_M, BLOCK_N, warps, stages), kept only if they compile for sm_90 without register
# spills in bf16 and fp16 at head dims 64 and 128 (tests/kernels/test_compile_sm90.py; table in docs/kernels.md).
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)])
_BWD_CONFIGS = _configs([(32, 64, 8, 2), (32, 64, 8, 1), (16, 128, 8, 2)])
_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16}
_LOG2E = 1.4426950408889634


@triton_helper
def _program_heads(pid_bh, H, GROUP):
    """(batch, query head, kv head) of a program over batch x heads."""
    i_b = pid_bh // H
    i_h = pid_bh % H
    return i_b, i_h, i_h // GROUP


@triton_helper
def _causal_bounds(pid_m, SQ, SK, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Key range a query block scans: [0, hi), and full_until (key blocks ending there or before need no mask)."""
    hi = SK
    full_until = SK
    if CAUSAL:
        shift = SK - SQ
        hi = tl.maximum(tl.minimum(SK, (pid_m + 1) * BLOCK_M + shift), 0)
        full_until = tl.minimum(SK, pid_m * BLOCK_M + shift + 1)
    return hi, full_until


@triton_helper
def _visible(rows, cols, SQ, SK, CAUSAL: tl.constexpr):
    """[M, N] mask of the query rows x key columns that attend (in range, bottom-right causal)."""
    visible = (rows < SQ)[:, None] & (cols < SK)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + (SK - SQ))
    return visible


@triton_helper
def _load_lse2(LSE, row_base, rows, SQ):
    """Base-2 log-sum-exp of the rows; +inf for rows out of range or with no visible key, so that p = 0."""
    lse = tl.load(LSE + row_base + rows, mask=rows < SQ, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@triton_kernel(configs=_FWD_CONFIGS, key=["D", "CAUSAL"], interpret=_INTERPRET)
def _forward_kernel(Q, K, V, O, LSE, scale, SQ, SK, H, GROUP, D,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b, i_h, i_hk = _program_heads(pid_bh, H, GROUP)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    q = load_rows(head_ptr(Q, i_b, i_h, stride_qb, stride_qh), start_m, offs_m, offs_d, stride_qs, SQ, D)
    k_base = head_ptr(K, i_b, i_hk, stride_kb, stride_kh)
    v_base = head_ptr(V, i_b, i_hk, stride_vb, stride_vh)
    qk_scale = scale * 1.4426950408889634  # work in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    hi, full_until = _causal_bounds(pid_m, SQ, SK, BLOCK_M, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        k = load_rows(k_base, start_n, offs_n, offs_d, stride_ks, SK, D)  # [BLOCK_N, BLOCK_D]
        v = load_rows(v_base, start_n, offs_n, offs_d, stride_vs, SK, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        if start_n + BLOCK_N > full_until:
            s = tl.where(_visible(rows, start_n + offs_n, SQ, SK, CAUSAL), s, float("-inf"))
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
    store_rows(head_ptr(O, i_b, i_h, stride_ob, stride_oh), start_m, offs_m, offs_d, stride_os, SQ, D, o)
    tl.store(LSE + tl.cast(pid_bh, tl.int64) * SQ + rows, lse, mask=rows < SQ)


@triton_kernel(configs=_BWD_CONFIGS, key=["D", "CAUSAL"], interpret=_INTERPRET, restore_value=["DQ"])
def _backward_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, scale, SQ, SK, H, HKV, GROUP, D,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                     stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh,
                     CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (key block, batch x kv head), FlashAttention-2's five matmuls per (query, key) block
    # pair, transposed so the key block is the row dimension:
    #   s^T = k q^T,  dp^T = v do^T,  dv += p^T do,  dk += ds^T q,  dq += ds k  (ds = p (dp - delta))
    # dk, dv are summed over every query head of the GQA group and query block; dq goes to a float32
    # buffer with atomic adds (the key blocks of one query block run in different programs).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    i_b = pid_bh // HKV
    i_hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    k = load_rows(head_ptr(K, i_b, i_hk, stride_kb, stride_kh), start_n, offs_n, offs_d, stride_ks, SK, D)
    v = load_rows(head_ptr(V, i_b, i_hk, stride_vb, stride_vh), start_n, offs_n, offs_d, stride_vs, SK, D)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    lo = 0
    full_from = 0  # query blocks starting here or after see every key of this block
    if CAUSAL:
        shift = SK - SQ
        # the first query that sees this block's first key, rounded down to a query block
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        full_from = start_n + BLOCK_N - 1 - shift
    key_tail = start_n + BLOCK_N > SK
    for g in range(0, GROUP):
        i_h = tl.cast(i_hk, tl.int64) * GROUP + g
        q_base = head_ptr(Q, i_b, i_h, stride_qb, stride_qh)
        do_base = head_ptr(DO, i_b, i_h, stride_dob, stride_doh)
        dq_base = head_ptr(DQ, i_b, i_h, stride_dqb, stride_dqh)
        row_base = (tl.cast(i_b, tl.int64) * H + i_h) * SQ
        for start_m in range(lo, SQ, BLOCK_M):
            rows = start_m + offs_m
            q = load_rows(q_base, start_m, offs_m, offs_d, stride_qs, SQ, D)  # [BLOCK_M, BLOCK_D]
            do = load_rows(do_base, start_m, offs_m, offs_d, stride_dos, SQ, D)
            lse = _load_lse2(LSE, row_base, rows, SQ)
            delta = tl.load(DELTA + row_base + rows, mask=rows < SQ, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            p_t = tl.exp2(s_t - lse[None, :])
            if key_tail | (start_m < full_from):
                p_t = tl.where(tl.trans(_visible(rows, cols, SQ, SK, CAUSAL)), p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q, input_precision=PRECISION)
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_D]
            dq_mask = (rows < SQ)[:, None] & (offs_d < D)[None, :]
            tl.atomic_add(row_block_ptrs(dq_base, start_m, offs_m, offs_d, stride_dqs), dq, mask=dq_mask,
                          sem="relaxed")

    store_rows(head_ptr(DK, i_b, i_hk, stride_dkb, stride_dkh), start_n, offs_n, offs_d, stride_dks, SK, D,
               dk * scale)
    store_rows(head_ptr(DV, i_b, i_hk, stride_dkb, stride_dkh), start_n, offs_n, offs_d, stride_dks, SK, D, dv)


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
    check_row_stride(q, k, v)


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
    do, q, k, v = (_inner_contiguous(x) for x in (do, q, k, v))
    check_row_stride(do)
    batch, sq, heads, d = q.shape
    sk, heads_kv = k.shape[1], k.shape[2]
    # delta_i = do_i . o_i; a gradient flowing into lse_i enters as -d_lse_i (d lse_i / d s_ij = p_ij)
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2)  # [b, h, sq]
    if d_lse is not None:
        delta = delta - d_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dk = new_output(k.shape, k.dtype, k.device)  # [b, sk, h_kv, d], contiguous like dv
    dv = new_output(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    # dq accumulates over key blocks with atomic adds: a zeroed float32 buffer, cast at the end
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), batch * heads_kv)  # noqa: E731
    _backward_kernel[grid](q, k, v, do, lse, delta, dq_acc, dk, dv, scale, sq, sk, heads, heads_kv,
                           heads // heads_kv, d, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                           *do.stride()[:3], *dq_acc.stride()[:3], *dk.stride()[:3],
                           CAUSAL=causal, PRECISION=dot_precision(q.dtype), BLOCK_D=pow2(d))
    dq = dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)
    return dq, dk, dv


@torch.library.custom_op("lctrain::flash_attention_fwd", mutates_args=())
def flash_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel as a torch custom op: (o, lse). Meta/fake tensors take the fake kernel below."""
    check_runnable(q, k, v)
    return _forward(q, k, v, causal, scale)


@flash_attention_fwd_op.register_fake
def _forward_fake(q, k, v, causal, scale):
    batch, sq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, sq), dtype=torch.float32)


@torch.library.custom_op("lctrain::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, causal: bool, scale: float,
                           d_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernels as a torch custom op: (dq, dk, dv) from any (o, lse) pair (and a gradient of lse)."""
    check_runnable(do, q, k, v)
    return _backward(do, q, k, v, o, lse, causal, scale, d_lse)


@flash_attention_bwd_op.register_fake
def _backward_fake(do, q, k, v, o, lse, causal, scale, d_lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx, do, d_lse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale, d_lse)
    return dq, dk, dv, None, None


# Differentiable through o and lse: the backward op honours a gradient of lse too.
flash_attention_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    return flash_attention_fwd_op(q, k, v, causal, scale)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                            softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_attention` without autograd: (o, lse) for callers that run `flash_attention_backward` themselves.

    Args and Returns: as `flash_attention`.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    with torch.no_grad():
        return flash_attention_fwd_op(q, k, v, causal, scale)


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
    return flash_attention_bwd_op(do, q, k, v, o, lse, causal, scale, None)
