"""Lightning Attention-2 in Triton: causal linear attention with per-head decay, tiled over the sequence.

Each program walks a segment of the sequence block by block and keeps the running state in float32
registers: inside a block, ordinary masked attention with the decay matrix lambda^(i-j); across
blocks, the kernel trick (the state S = sum lambda^(.) k^T v), so the cost is linear in the sequence
length and there is no cumsum. Long sequences with few batch x heads are cut into segments run in
parallel from a zero state; the state at each segment boundary is then a decayed sum of the segments'
own last states, added to the rows by one more pass. The backward is hand-written: dq is the forward
recurrence on (do, v, k) with the transposed initial state; dk and dv run the same recurrence
backwards in time on the state gradient, which ends as d initial_state. The gradient of log_decay
follows from dq and dk in closed form. Derivations: README.md beside this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lctrain.kernels.utils import (check_dtype, check_runnable, dot_precision, interpreting, new_output, pow2,
                                  triton_kernel)

# Hopper-oriented candidates: 64-token blocks (the decay matrix and scores stay in registers), value
# tiles of 64 or 128 columns.
_CONFIGS = [triton.Config({"BLOCK": 64, "BLOCK_C": block_c}, num_warps=warps, num_stages=stages)
            for block_c in (64, 128) for warps in (4, 8) for stages in (2, 3)]
_INTERPRET = {"BLOCK": 16, "BLOCK_C": 16}


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET)
def _forward_kernel(A, B, C, LOG_DECAY, X0, OUT, XN, T, H, DA, DC, SEG_LEN,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # Over the rows of one segment [seg_start, seg_end), block by block:
    # out_i = sum_{j<=i} lambda^(i-j) (a_i . b_j) c_j + lambda^(i+1) a_i X  (X: state before the block)
    # X    <- lambda^n X + sum_j lambda^(n-1-j) b_j^T c_j                   (n: valid rows of the block)
    # a, b: [B, T, H, DA], c and out: [B, T, H, DC] (contiguous); X0: [B, H, DA, DC] float32;
    # XN: [segments, B, H, DA, DC], each segment's last X.
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    seg_start = seg * SEG_LEN
    seg_end = tl.minimum(T, seg_start + SEG_LEN)
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
    for start in range(seg_start, seg_end, BLOCK):
        rows = start + offs_t
        mask_t = rows < seg_end
        n_valid = tl.minimum(seg_end - start, BLOCK)
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
        xn_offs = (seg * tl.num_programs(1) + pid_bh) * DA * DC + offs_a[:, None] * DC + offs_c[None, :]
        tl.store(XN + xn_offs, x, mask=x_mask)


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET)
def _reverse_kernel(A, B, C, LOG_DECAY, X0, OUT, XN, T, H, DA, DC, SEG_LEN,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # The same recurrence backwards in time over one segment (blocks from last to first; only the
    # segment's last block may be partial):
    # out_j = sum_{i>=j} lambda^(i-j) (a_j . b_i) c_i + lambda^(n-1-j) a_j X  (X: state after the block)
    # X    <- lambda^n X + sum_i lambda^(i+1) b_i^T c_i
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    seg_start = seg * SEG_LEN
    seg_end = tl.minimum(T, seg_start + SEG_LEN)
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
    num_blocks = (seg_end - seg_start + BLOCK - 1) // BLOCK
    for r in range(0, num_blocks):
        start = seg_start + (num_blocks - 1 - r) * BLOCK
        rows = start + offs_t
        mask_t = rows < seg_end
        n_valid = tl.minimum(seg_end - start, BLOCK)
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
        xn_offs = (seg * tl.num_programs(1) + pid_bh) * DA * DC + offs_a[:, None] * DC + offs_c[None, :]
        tl.store(XN + xn_offs, x, mask=x_mask)


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET, restore_value=["OUT"])
def _boundary_kernel(A, LOCAL, X0, LOG_DECAY, OUT, T, H, DA, DC, SEG_LEN, NSEG,
                     stride_xb, stride_xh, stride_xa, stride_xc,
                     HAS_X0: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # Adds to one segment, run from a zero state, what comes from outside it: the state at its boundary
    # X = lambda^(distance) X0 + sum over the segments before it (REVERSE: after it) of lambda^(gap) LOCAL_r
    # enters row i as lambda^(i - seg_start + 1) a_i X (REVERSE: lambda^(seg_end - 1 - i) a_i X).
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    seg_start = seg * SEG_LEN
    seg_end = tl.minimum(T, seg_start + SEG_LEN)
    i_b = pid_bh // H
    i_h = pid_bh % H
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)

    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_a = offs_a < DA
    mask_c = offs_c < DC
    x_mask = mask_a[:, None] & mask_c[None, :]
    x = tl.full([BLOCK_A, BLOCK_C], 0.0, dtype=tl.float32)
    if HAS_X0:
        x0_offs = i_b * stride_xb + i_h * stride_xh + offs_a[:, None] * stride_xa + offs_c[None, :] * stride_xc
        if REVERSE:
            distance = T - seg_end
        else:
            distance = seg_start
        x = tl.load(X0 + x0_offs, mask=x_mask, other=0.0).to(tl.float32) * tl.exp(gamma * distance.to(tl.float32))
    local_offs = offs_a[:, None] * DC + offs_c[None, :]
    for r in range(0, NSEG):
        r_start = r * SEG_LEN
        r_end = tl.minimum(T, r_start + SEG_LEN)
        if REVERSE:
            weight = tl.where(r > seg, tl.exp(gamma * tl.maximum(r_start - seg_end, 0).to(tl.float32)), 0.0)
        else:
            weight = tl.where(r < seg, tl.exp(gamma * tl.maximum(seg_start - r_end, 0).to(tl.float32)), 0.0)
        local = tl.load(LOCAL + (r * tl.num_programs(1) + pid_bh) * DA * DC + local_offs, mask=x_mask, other=0.0)
        x += weight * local

    a_base = A + i_b * T * H * DA + i_h * DA
    o_base = OUT + i_b * T * H * DC + i_h * DC
    for start in range(seg_start, seg_end, BLOCK):
        rows = start + offs_t
        mask_t = rows < seg_end
        if REVERSE:
            steps = tl.maximum(seg_end - 1 - rows, 0)
        else:
            steps = rows - seg_start + 1
        row_decay = tl.exp(gamma * steps.to(tl.float32))
        a = tl.load(a_base + rows[:, None] * H * DA + offs_a[None, :], mask=mask_t[:, None] & mask_a[None, :],
                    other=0.0)  # [BLOCK, BLOCK_A]
        o_ptrs = o_base + rows[:, None] * H * DC + offs_c[None, :]
        o_mask = mask_t[:, None] & mask_c[None, :]
        out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        out += tl.dot(a, x.to(a.dtype), input_precision=PRECISION) * row_decay[:, None]  # [BLOCK, BLOCK_C]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)


def _segments(batch_heads: int, seq: int, dc: int, sm_count: int | None) -> tuple[int, int]:
    """(number of segments, tokens per segment) the sequence is cut into so that enough programs run.

    One program walks a whole segment. With few batch x head x column tiles (long sequences, small
    batches) the sequence is split for about two programs per SM (`sm_count`), into segments of at
    least 512 tokens. Under the interpreter (`sm_count` None) segments are 32 tokens (two blocks), so
    the tests cover the split.
    """
    if sm_count is None:
        seg_len = 32
    else:
        programs = batch_heads * triton.cdiv(dc, 64)
        count = max(1, min(triton.cdiv(2 * sm_count, programs), seq // 512))
        seg_len = triton.cdiv(triton.cdiv(seq, count), 128) * 128
    seg_len = max(seg_len, 1)
    return max(1, triton.cdiv(seq, seg_len)), seg_len


def _launch(forward: bool, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, log_decay: torch.Tensor,
            x0: torch.Tensor | None, out_dtype: torch.dtype, store_xn: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one recurrence, forward or backward in time: out [B, T, H, DC] in out_dtype, and the last
    state [B, H, DA, DC] float32 if asked.

    Segments of the sequence run in parallel from a zero state; the states at their boundaries follow
    in closed form from each segment's own last state, and `_boundary_kernel` adds them to every row.
    """
    batch, seq, heads, da = a.shape
    dc = c.shape[-1]
    kernel = _forward_kernel if forward else _reverse_kernel
    sm_count = None if interpreting() else torch.cuda.get_device_properties(a.device).multi_processor_count
    nseg, seg_len = _segments(batch * heads, seq, dc, sm_count)
    out = new_output((batch, seq, heads, dc), out_dtype, a.device)
    grid = lambda meta: (triton.cdiv(dc, meta["BLOCK_C"]), batch * heads, nseg)  # noqa: E731
    common = dict(PRECISION=dot_precision(a.dtype), BLOCK_A=pow2(da))
    x0_arg = x0 if x0 is not None else out
    x_strides = x0.stride() if x0 is not None else (0, 0, 0, 0)
    if nseg == 1:
        xn = new_output((batch, heads, da, dc), torch.float32, a.device) if store_xn else None
        kernel[grid](a, b, c, log_decay, x0_arg, out, xn if xn is not None else out, seq, heads, da, dc, seg_len,
                     *x_strides, HAS_X0=x0 is not None, STORE_XN=store_xn, **common)
        return out, xn
    local = new_output((nseg, batch, heads, da, dc), torch.float32, a.device)  # each segment's own last state
    kernel[grid](a, b, c, log_decay, out, out, local, seq, heads, da, dc, seg_len, 0, 0, 0, 0,
                 HAS_X0=False, STORE_XN=True, **common)
    _boundary_kernel[grid](a, local, x0_arg, log_decay, out, seq, heads, da, dc, seg_len, nseg, *x_strides,
                           HAS_X0=x0 is not None, REVERSE=not forward, **common)
    if not store_xn:
        return out, None
    # last state = lambda^T X0 + sum_r lambda^(gap) LOCAL_r, gap = T - r_end (forward) or r_start (backward)
    starts = torch.arange(nseg, device=a.device) * seg_len
    gaps = seq - (starts + seg_len).clamp(max=seq) if forward else starts
    weights = torch.exp(log_decay[None, :] * gaps[:, None].float())  # [nseg, h]
    xn = (local * weights[:, None, :, None, None]).sum(0)  # [b, h, da, dc]
    if x0 is not None:
        xn = xn + torch.exp(log_decay * seq)[None, :, None, None] * x0.float()
    return out, xn


class LightningAttentionFunction(torch.autograd.Function):
    """Lightning attention with the hand-written Triton backward (dq, dk, dv, d initial_state, d log_decay)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, output_final_state):
        o, final = _launch(True, q, k, v, log_decay, initial_state, v.dtype, output_final_state)
        ctx.save_for_backward(q, k, v, log_decay, initial_state, final)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, log_decay, initial_state, final = ctx.saved_tensors
        do = do.contiguous()
        d_final = d_final.contiguous() if d_final is not None else None
        need_q, need_k, need_v, need_decay, need_s0 = ctx.needs_input_grad[:5]
        dq = dk = dv = d_s0 = None
        # d log_decay sums (t+1)-weighted products of dq and dk over all tokens: keep them float32 for it
        grad_dtype = torch.float32 if need_decay else None
        if need_q or need_decay:
            # dq_i = sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S0^T: the forward on (do, v, k)
            s0_t = initial_state.transpose(-1, -2) if initial_state is not None else None  # [b, h, dv, dk]
            dq, _ = _launch(True, do, v, k, log_decay, s0_t, grad_dtype or q.dtype, False)
        # dv_j = k_j D_j, dk_j = D_j v_j^T with D_j = sum_{i>=j} lambda^(i-j) q_i^T do_i + lambda^(n-1-j) dFinal
        if need_v or need_s0:
            dv, d_s0 = _launch(False, k, q, do, log_decay, d_final, v.dtype,
                               initial_state is not None and need_s0)
        if need_k or need_decay:
            d_final_t = d_final.transpose(-1, -2) if d_final is not None else None
            dk, _ = _launch(False, v, do, q, log_decay, d_final_t, grad_dtype or k.dtype, False)
        d_log_decay = None
        if need_decay:
            d_log_decay = _log_decay_grad(q, k, dq, dk, final, d_final)
            dq, dk = dq.to(q.dtype), dk.to(k.dtype)
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
