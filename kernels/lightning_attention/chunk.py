"""Lightning Attention-2 in Triton: causal linear attention with per-head decay, tiled over the sequence.

Each program walks a segment of the sequence block by block and keeps the running state in float32
registers: inside a block, ordinary masked attention with the decay matrix lambda^(i-j); across
blocks, the kernel trick (the state S = sum lambda^(.) k^T v), so the cost is linear in the sequence
length and there is no cumsum. Long sequences with few batch x heads are cut into segments run in
parallel from a zero state; the state at each segment boundary is then a decayed sum of the segments'
own last states, added to the rows by one more pass. The backward is hand-written, two recurrences:
dq is the forward recurrence on (do, v, k) with the transposed initial state; one reverse pass carries
the state gradient backwards in time and gives dk, dv, d initial_state and d log_decay, the last as a sum
over query-key pairs with non-negative position weights (no cancellation, float32-accurate at any
length). Derivations: README.md beside this file.

The launchers are torch custom ops (`lctrain::lightning_attention_fwd`, `lctrain::lightning_attention_bwd`)
with fake kernels and the backward registered as the forward's autograd formula, so meta and fake tensors (the
rehearsal, the planner) and torch.compile pass through them; the real kernels run on CUDA or under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lctrain.kernels.utils import (TritonKernel, check_dtype, check_row_stride, check_runnable, dot_precision,
                                  head_ptr, interpreting, load_rows, new_output, pow2, store_rows, triton_helper,
                                  triton_kernel)

# Hopper candidates, kept only if they compile for sm_90 without register spills in bf16/fp16 at head dims 64
# and 128 (docs/kernels.md has the table): 64-token blocks and 64 value columns, 8 warps, forward. The reverse
# pass holds more tiles: 32-token blocks, and 16 when it also carries the position-weighted state for
# d log_decay (the same kernel, compiled with NEED_DGAMMA, under its own autotuner); its boundary pass with
# d log_decay holds two states: 32 value columns.
_CONFIGS = [triton.Config({"BLOCK": 64, "BLOCK_C": 64}, num_warps=8, num_stages=stages) for stages in (2, 3)]
_REVERSE_CONFIGS = [triton.Config({"BLOCK": 32, "BLOCK_C": 64}, num_warps=8, num_stages=stages) for stages in (2, 3)]
_REVERSE_DGAMMA_CONFIGS = [triton.Config({"BLOCK": 16, "BLOCK_C": 64}, num_warps=8, num_stages=stages)
                           for stages in (2, 3)]
_BOUNDARY_DGAMMA_CONFIGS = [triton.Config({"BLOCK": 32, "BLOCK_C": 32}, num_warps=8, num_stages=stages)
                            for stages in (2, 3)]
_INTERPRET = {"BLOCK": 16, "BLOCK_C": 16}


@triton_helper
def _program(H, T, SEG_LEN, BLOCK_C: tl.constexpr):
    """This program's (column tile, batch x head, batch, head, segment, segment start, segment end, columns)."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    seg_start = seg * SEG_LEN
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_c, pid_bh, pid_bh // H, pid_bh % H, seg, seg_start, tl.minimum(T, seg_start + SEG_LEN), offs_c


@triton_helper
def _decay_matrix(gamma, offs_t, REVERSE: tl.constexpr):
    """lambda^(i-j) [i >= j] for rows i, columns j (REVERSE: lambda^(j-i) [j >= i]), lambda = exp(gamma)."""
    if REVERSE:
        diff = offs_t[None, :] - offs_t[:, None]
    else:
        diff = offs_t[:, None] - offs_t[None, :]
    return tl.where(diff >= 0, tl.exp(gamma * tl.maximum(diff, 0).to(tl.float32)), 0.0)


@triton_helper
def _load_state(X, i_b, i_h, offs_a, offs_c, DA, DC, stride_xb, stride_xh, stride_xa, stride_xc,
                HAS_X: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr):
    """The [BLOCK_A, BLOCK_C] float32 tile of a [B, H, DA, DC] state (zeros without one)."""
    if HAS_X:
        cols = tl.cast(offs_c, tl.int64)  # int64: a transposed state's column stride is DA
        ptrs = head_ptr(X, i_b, i_h, stride_xb, stride_xh) + (offs_a[:, None] * stride_xa + cols[None, :] * stride_xc)
        x = tl.load(ptrs, mask=(offs_a < DA)[:, None] & (offs_c < DC)[None, :], other=0.0).to(tl.float32)
    else:
        x = tl.full([BLOCK_A, BLOCK_C], 0.0, dtype=tl.float32)
    return x


@triton_helper
def _segment_state_ptrs(X, seg, pid_bh, offs_a, offs_c, DA, DC):
    """Pointers to the tile of a per-segment state buffer [segments, B * H, DA, DC] (contiguous, float32)."""
    base = X + (tl.cast(seg, tl.int64) * tl.num_programs(1) + pid_bh) * DA * DC
    return base + (offs_a[:, None] * DC + offs_c[None, :])


@triton_helper
def _sum_all(x):
    """Sum of every element of a 2-D block (a float32 scalar)."""
    return tl.reduce(tl.reduce(x, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET)
def _forward_kernel(A, B, C, LOG_DECAY, X0, OUT, XN, T, H, DA, DC, SEG_LEN,
                    stride_ab, stride_at, stride_ah, stride_cb, stride_ct, stride_ch,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0: tl.constexpr, STORE_XN: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # Over the rows of one segment [seg_start, seg_end), block by block:
    # out_i = sum_{j<=i} lambda^(i-j) (a_i . b_j) c_j + lambda^(i+1) a_i X  (X: state before the block)
    # X    <- lambda^n X + sum_j lambda^(n-1-j) b_j^T c_j                   (n: valid rows of the block)
    # a, b: [B, T, H, DA], c and out: [B, T, H, DC]; X0: [B, H, DA, DC] float32;
    # XN: [segments, B, H, DA, DC], each segment's last X.
    pid_c, pid_bh, i_b, i_h, seg, seg_start, seg_end, offs_c = _program(H, T, SEG_LEN, BLOCK_C)
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)
    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    intra_decay = _decay_matrix(gamma, offs_t, False)
    row_decay = tl.exp(gamma * (offs_t + 1).to(tl.float32))
    x = _load_state(X0, i_b, i_h, offs_a, offs_c, DA, DC, stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0, BLOCK_A, BLOCK_C)

    a_base = head_ptr(A, i_b, i_h, stride_ab, stride_ah)
    b_base = head_ptr(B, i_b, i_h, stride_ab, stride_ah)
    c_base = head_ptr(C, i_b, i_h, stride_cb, stride_ch)
    o_base = head_ptr(OUT, i_b, i_h, stride_cb, stride_ch)
    for start in range(seg_start, seg_end, BLOCK):
        n_valid = tl.minimum(seg_end - start, BLOCK)
        a = load_rows(a_base, start, offs_t, offs_a, stride_at, seg_end, DA)  # [BLOCK, BLOCK_A]
        b = load_rows(b_base, start, offs_t, offs_a, stride_at, seg_end, DA)
        c = load_rows(c_base, start, offs_t, offs_c, stride_ct, seg_end, DC)  # [BLOCK, BLOCK_C]

        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION) * intra_decay  # [BLOCK, BLOCK]
        out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
        out += tl.dot(a, x.to(a.dtype), input_precision=PRECISION) * row_decay[:, None]  # [BLOCK, BLOCK_C]
        store_rows(o_base, start, offs_t, offs_c, stride_ct, seg_end, DC, out)

        b_decay = tl.where(offs_t < n_valid, tl.exp(gamma * tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32)), 0.0)
        b_decayed = (b * b_decay[:, None]).to(b.dtype)
        x = x * tl.exp(gamma * n_valid.to(tl.float32))
        x += tl.dot(tl.trans(b_decayed), c, input_precision=PRECISION)  # [BLOCK_A, BLOCK_C]

    if STORE_XN:
        tl.store(_segment_state_ptrs(XN, seg, pid_bh, offs_a, offs_c, DA, DC), x,
                 mask=(offs_a < DA)[:, None] & (offs_c < DC)[None, :])


@triton_kernel(configs=_REVERSE_CONFIGS, key=["DA", "DC", "NEED_DGAMMA"], interpret=_INTERPRET,
               restore_value=["DKP", "DGAMMA"])
def _reverse_kernel(Q, K, V, DO, LOG_DECAY, G, DV, DKP, LOCAL, LOCALW, DGAMMA, T, H, DA, DC, SEG_LEN,
                    stride_ab, stride_at, stride_ah, stride_cb, stride_ct, stride_ch, stride_p,
                    stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_G: tl.constexpr, NEED_DGAMMA: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # One pass backwards in time over a segment, the state gradient Y = dS (float32) carried from its end:
    #   dv_j = sum_{i>=j} lambda^(i-j) (k_j . q_i) do_i + lambda^(m-1-j) k_j Y
    #   dk_j = sum_{i>=j} lambda^(i-j) (v_j . do_i) q_i + lambda^(m-1-j) v_j Y^T   (this column tile's part)
    #   Y   <- lambda^m Y + sum_i lambda^(i+1) q_i^T do_i
    # and, with NEED_DGAMMA, d log_decay as a sum over (query, key) pairs of (t - s) lambda^(t-s)
    # (q_t . k_s)(do_t . v_s): inside the block from the two score matrices, across the block end from
    # Y and the position-weighted Yw <- lambda^m (Yw + m Y) + sum_i (i+1) lambda^(i+1) q_i^T do_i.
    # LOCAL/LOCALW: Y and Yw at the segment start; DGAMMA: [column tiles, segments, B * H] partial sums.
    pid_c, pid_bh, i_b, i_h, seg, seg_start, seg_end, offs_c = _program(H, T, SEG_LEN, BLOCK_C)
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)
    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    intra_decay = _decay_matrix(gamma, offs_t, True)  # [j, i]: lambda^(i-j) [i >= j]
    pair_weight = tl.maximum(offs_t[None, :] - offs_t[:, None], 0).to(tl.float32)  # [j, i]: i - j
    col_decay = tl.exp(gamma * (offs_t + 1).to(tl.float32))
    y = _load_state(G, i_b, i_h, offs_a, offs_c, DA, DC, stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_G, BLOCK_A, BLOCK_C)
    yw = tl.full([BLOCK_A, BLOCK_C], 0.0, dtype=tl.float32)
    d_gamma = tl.cast(0.0, tl.float32)

    q_base = head_ptr(Q, i_b, i_h, stride_ab, stride_ah)
    k_base = head_ptr(K, i_b, i_h, stride_ab, stride_ah)
    v_base = head_ptr(V, i_b, i_h, stride_cb, stride_ch)
    do_base = head_ptr(DO, i_b, i_h, stride_cb, stride_ch)
    dv_base = head_ptr(DV, i_b, i_h, stride_cb, stride_ch)
    dk_base = head_ptr(DKP + tl.cast(pid_c, tl.int64) * stride_p, i_b, i_h, stride_ab, stride_ah)
    num_blocks = (seg_end - seg_start + BLOCK - 1) // BLOCK
    for r in range(0, num_blocks):
        start = seg_start + (num_blocks - 1 - r) * BLOCK
        n_valid = tl.minimum(seg_end - start, BLOCK)
        q = load_rows(q_base, start, offs_t, offs_a, stride_at, seg_end, DA)  # [BLOCK, BLOCK_A]
        k = load_rows(k_base, start, offs_t, offs_a, stride_at, seg_end, DA)
        v = load_rows(v_base, start, offs_t, offs_c, stride_ct, seg_end, DC)  # [BLOCK, BLOCK_C]
        do = load_rows(do_base, start, offs_t, offs_c, stride_ct, seg_end, DC)

        a_decay = tl.where(offs_t < n_valid, tl.exp(gamma * tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32)), 0.0)
        kq = tl.dot(k, tl.trans(q), input_precision=PRECISION) * intra_decay  # [BLOCK, BLOCK]: [j, i]
        vdo = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK, BLOCK], this column tile's part
        ky = tl.dot(k, y.to(k.dtype), input_precision=PRECISION) * a_decay[:, None]  # [BLOCK, BLOCK_C]
        dv = tl.dot(kq.to(do.dtype), do, input_precision=PRECISION) + ky
        store_rows(dv_base, start, offs_t, offs_c, stride_ct, seg_end, DC, dv)
        dk = tl.dot((vdo * intra_decay).to(q.dtype), q, input_precision=PRECISION)
        dk += tl.dot(v, tl.trans(y).to(v.dtype), input_precision=PRECISION) * a_decay[:, None]  # [BLOCK, BLOCK_A]
        store_rows(dk_base, start, offs_t, offs_a, stride_at, seg_end, DA, dk)

        block_decay = tl.exp(gamma * n_valid.to(tl.float32))
        q_decayed = q * col_decay[:, None]
        if NEED_DGAMMA:
            kyw = tl.dot(k, yw.to(k.dtype), input_precision=PRECISION)  # [BLOCK, BLOCK_C]
            steps = tl.maximum(n_valid - 1 - offs_t, 0).to(tl.float32)
            cross = v.to(tl.float32) * (kyw * a_decay[:, None] + ky * steps[:, None])
            d_gamma += _sum_all(kq * vdo * pair_weight) + _sum_all(cross)
            q_weighted = (q_decayed * (offs_t + 1).to(tl.float32)[:, None]).to(q.dtype)
            yw = block_decay * (yw + n_valid.to(tl.float32) * y)
            yw += tl.dot(tl.trans(q_weighted), do, input_precision=PRECISION)
        y = y * block_decay
        y += tl.dot(tl.trans(q_decayed.to(q.dtype)), do, input_precision=PRECISION)  # [BLOCK_A, BLOCK_C]

    x_mask = (offs_a < DA)[:, None] & (offs_c < DC)[None, :]
    tl.store(_segment_state_ptrs(LOCAL, seg, pid_bh, offs_a, offs_c, DA, DC), y, mask=x_mask)
    if NEED_DGAMMA:
        tl.store(_segment_state_ptrs(LOCALW, seg, pid_bh, offs_a, offs_c, DA, DC), yw, mask=x_mask)
        tl.store(DGAMMA + (tl.cast(pid_c, tl.int64) * tl.num_programs(2) + seg) * tl.num_programs(1) + pid_bh,
                 d_gamma)


_reverse_dgamma_kernel = TritonKernel(_reverse_kernel.fn, _REVERSE_DGAMMA_CONFIGS, ["DA", "DC", "NEED_DGAMMA"],
                                      _INTERPRET, ["DKP", "DGAMMA"])


@triton_kernel(configs=_CONFIGS, key=["DA", "DC"], interpret=_INTERPRET, restore_value=["OUT"])
def _boundary_kernel(A, LOCAL, X0, LOG_DECAY, OUT, T, H, DA, DC, SEG_LEN, NSEG,
                     stride_ab, stride_at, stride_ah, stride_cb, stride_ct, stride_ch,
                     stride_xb, stride_xh, stride_xa, stride_xc,
                     HAS_X0: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # Adds to one segment of the forward recurrence, run from a zero state, what comes from before it:
    # the state X = lambda^(seg_start) X0 + sum_{r < seg} lambda^(seg_start - r_end) LOCAL_r enters
    # row i as lambda^(i - seg_start + 1) a_i X.
    pid_c, pid_bh, i_b, i_h, seg, seg_start, seg_end, offs_c = _program(H, T, SEG_LEN, BLOCK_C)
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)
    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    x_mask = (offs_a < DA)[:, None] & (offs_c < DC)[None, :]
    x = _load_state(X0, i_b, i_h, offs_a, offs_c, DA, DC, stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_X0, BLOCK_A, BLOCK_C) * tl.exp(gamma * seg_start.to(tl.float32))
    for r in range(0, NSEG):
        r_end = tl.minimum(T, r * SEG_LEN + SEG_LEN)
        weight = tl.where(r < seg, tl.exp(gamma * tl.maximum(seg_start - r_end, 0).to(tl.float32)), 0.0)
        x += weight * tl.load(_segment_state_ptrs(LOCAL, r, pid_bh, offs_a, offs_c, DA, DC), mask=x_mask, other=0.0)

    a_base = head_ptr(A, i_b, i_h, stride_ab, stride_ah)
    o_base = head_ptr(OUT, i_b, i_h, stride_cb, stride_ch)
    for start in range(seg_start, seg_end, BLOCK):
        row_decay = tl.exp(gamma * (start - seg_start + offs_t + 1).to(tl.float32))
        a = load_rows(a_base, start, offs_t, offs_a, stride_at, seg_end, DA)  # [BLOCK, BLOCK_A]
        out = load_rows(o_base, start, offs_t, offs_c, stride_ct, seg_end, DC).to(tl.float32)
        out += tl.dot(a, x.to(a.dtype), input_precision=PRECISION) * row_decay[:, None]  # [BLOCK, BLOCK_C]
        store_rows(o_base, start, offs_t, offs_c, stride_ct, seg_end, DC, out)


@triton_kernel(configs=_REVERSE_CONFIGS, key=["DA", "DC", "NEED_DGAMMA"], interpret=_INTERPRET,
               restore_value=["DV", "DKP", "DGAMMA"])
def _reverse_boundary_kernel(K, V, LOG_DECAY, G, LOCAL, LOCALW, DV, DKP, DGAMMA, T, H, DA, DC, SEG_LEN, NSEG,
                             stride_ab, stride_at, stride_ah, stride_cb, stride_ct, stride_ch, stride_p,
                             stride_xb, stride_xh, stride_xa, stride_xc,
                             HAS_G: tl.constexpr, NEED_DGAMMA: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_A: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    # Adds to one segment of the reverse pass, run from a zero state, what comes from after it: at its
    # end e, Y = lambda^(T-e) G + sum_{p > seg} lambda^(a_p - e) LOCAL_p and
    # Yw = (T-e) lambda^(T-e) G + sum_{p > seg} lambda^(a_p - e) (LOCALW_p + (a_p - e) LOCAL_p); row j gets
    # lambda^(e-1-j) k_j Y (dv), lambda^(e-1-j) v_j Y^T (dk) and the pairs across e (d log_decay).
    pid_c, pid_bh, i_b, i_h, seg, seg_start, seg_end, offs_c = _program(H, T, SEG_LEN, BLOCK_C)
    gamma = tl.load(LOG_DECAY + i_h).to(tl.float32)
    offs_t = tl.arange(0, BLOCK)
    offs_a = tl.arange(0, BLOCK_A)
    x_mask = (offs_a < DA)[:, None] & (offs_c < DC)[None, :]
    g = _load_state(G, i_b, i_h, offs_a, offs_c, DA, DC, stride_xb, stride_xh, stride_xa, stride_xc,
                    HAS_G, BLOCK_A, BLOCK_C)
    tail = (T - seg_end).to(tl.float32)
    y = g * tl.exp(gamma * tail)
    yw = y * tail
    for p in range(0, NSEG):
        gap = tl.maximum(p * SEG_LEN - seg_end, 0).to(tl.float32)
        weight = tl.where(p > seg, tl.exp(gamma * gap), 0.0)
        local = tl.load(_segment_state_ptrs(LOCAL, p, pid_bh, offs_a, offs_c, DA, DC), mask=x_mask, other=0.0)
        y += weight * local
        if NEED_DGAMMA:
            local_w = tl.load(_segment_state_ptrs(LOCALW, p, pid_bh, offs_a, offs_c, DA, DC), mask=x_mask, other=0.0)
            yw += weight * (local_w + gap * local)
    d_gamma = tl.cast(0.0, tl.float32)

    k_base = head_ptr(K, i_b, i_h, stride_ab, stride_ah)
    v_base = head_ptr(V, i_b, i_h, stride_cb, stride_ch)
    dv_base = head_ptr(DV, i_b, i_h, stride_cb, stride_ch)
    dk_base = head_ptr(DKP + tl.cast(pid_c, tl.int64) * stride_p, i_b, i_h, stride_ab, stride_ah)
    for start in range(seg_start, seg_end, BLOCK):
        steps = tl.maximum(seg_end - 1 - (start + offs_t), 0).to(tl.float32)
        row_decay = tl.where(start + offs_t < seg_end, tl.exp(gamma * steps), 0.0)
        k = load_rows(k_base, start, offs_t, offs_a, stride_at, seg_end, DA)  # [BLOCK, BLOCK_A]
        v = load_rows(v_base, start, offs_t, offs_c, stride_ct, seg_end, DC)  # [BLOCK, BLOCK_C]
        ky = tl.dot(k, y.to(k.dtype), input_precision=PRECISION) * row_decay[:, None]
        dv = load_rows(dv_base, start, offs_t, offs_c, stride_ct, seg_end, DC).to(tl.float32) + ky
        store_rows(dv_base, start, offs_t, offs_c, stride_ct, seg_end, DC, dv)
        dk = load_rows(dk_base, start, offs_t, offs_a, stride_at, seg_end, DA)
        dk += tl.dot(v, tl.trans(y).to(v.dtype), input_precision=PRECISION) * row_decay[:, None]
        store_rows(dk_base, start, offs_t, offs_a, stride_at, seg_end, DA, dk)
        if NEED_DGAMMA:
            kyw = tl.dot(k, yw.to(k.dtype), input_precision=PRECISION) * row_decay[:, None]
            d_gamma += _sum_all(v.to(tl.float32) * (kyw + ky * steps[:, None]))
    if NEED_DGAMMA:
        ptr = DGAMMA + (tl.cast(pid_c, tl.int64) * tl.num_programs(2) + seg) * tl.num_programs(1) + pid_bh
        tl.store(ptr, tl.load(ptr) + d_gamma)


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


_reverse_boundary_dgamma_kernel = TritonKernel(_reverse_boundary_kernel.fn, _BOUNDARY_DGAMMA_CONFIGS,
                                               ["DA", "DC", "NEED_DGAMMA"], _INTERPRET, ["DV", "DKP", "DGAMMA"])


def _sm_count(device: torch.device) -> int | None:
    return None if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


def _rows(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, D] tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, log_decay: torch.Tensor, x0: torch.Tensor | None,
             out_dtype: torch.dtype, store_xn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward recurrence: out [B, T, H, DC] in out_dtype, and the last state [B, H, DA, DC] float32 if asked.

    Segments of the sequence run in parallel from a zero state; the states at their boundaries follow
    in closed form from each segment's own last state, and `_boundary_kernel` adds them to every row.
    """
    batch, seq, heads, da = a.shape
    dc = c.shape[-1]
    nseg, seg_len = _segments(batch * heads, seq, dc, _sm_count(a.device))
    out = new_output((batch, seq, heads, dc), out_dtype, a.device)
    grid = lambda meta: (triton.cdiv(dc, meta["BLOCK_C"]), batch * heads, nseg)  # noqa: E731
    common = dict(PRECISION=dot_precision(a.dtype), BLOCK_A=pow2(da))
    x0_arg = x0 if x0 is not None else out
    x_strides = x0.stride() if x0 is not None else (0, 0, 0, 0)
    strides = (*_rows(a), *_rows(c))
    if nseg == 1:
        xn = new_output((batch, heads, da, dc), torch.float32, a.device) if store_xn else None
        _forward_kernel[grid](a, b, c, log_decay, x0_arg, out, xn if xn is not None else out, seq, heads, da, dc,
                              seg_len, *strides, *x_strides, HAS_X0=x0 is not None, STORE_XN=store_xn, **common)
        return out, xn
    local = new_output((nseg, batch, heads, da, dc), torch.float32, a.device)  # each segment's own last state
    _forward_kernel[grid](a, b, c, log_decay, out, out, local, seq, heads, da, dc, seg_len, *strides, 0, 0, 0, 0,
                          HAS_X0=False, STORE_XN=True, **common)
    _boundary_kernel[grid](a, local, x0_arg, log_decay, out, seq, heads, da, dc, seg_len, nseg, *strides,
                           *x_strides, HAS_X0=x0 is not None, **common)
    if not store_xn:
        return out, None
    # last state = lambda^T X0 + sum_r lambda^(T - r_end) LOCAL_r
    ends = (torch.arange(1, nseg + 1, device=a.device) * seg_len).clamp(max=seq)
    weights = torch.exp(log_decay[None, :] * (seq - ends)[:, None].float())  # [nseg, h]
    xn = (local * weights[:, None, :, None, None]).sum(0)  # [b, h, da, dc]
    if x0 is not None:
        xn = xn + torch.exp(log_decay * seq)[None, :, None, None] * x0.float()
    return out, xn


def _reverse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, log_decay: torch.Tensor,
             d_final: torch.Tensor | None, initial_state: torch.Tensor | None, need_decay: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One reverse pass: dk, dv, d initial_state [B, H, DK, DV] float32 and d log_decay [H] (or None).

    Column tiles of v each give a part of dk (summed here, float32); segments run in parallel from a
    zero state and `_reverse_boundary_kernel` adds what enters each one from the segments after it.
    """
    batch, seq, heads, da = q.shape
    dc = v.shape[-1]
    nseg, seg_len = _segments(batch * heads, seq, dc, _sm_count(q.device))
    # dk parts, one per column tile of the smallest BLOCK_C a launch may pick (unused ones stay 0)
    configs = _REVERSE_CONFIGS + _REVERSE_DGAMMA_CONFIGS + _BOUNDARY_DGAMMA_CONFIGS
    tiles = triton.cdiv(dc, _INTERPRET["BLOCK_C"] if interpreting() else min(c.kwargs["BLOCK_C"] for c in configs))
    dk_parts = torch.zeros((tiles, batch, seq, heads, da), dtype=torch.float32, device=q.device)
    dv = new_output(v.shape, v.dtype, v.device)
    local = new_output((nseg, batch, heads, da, dc), torch.float32, q.device)
    local_w = new_output((nseg, batch, heads, da, dc), torch.float32, q.device) if need_decay else local
    d_gamma = torch.zeros((tiles, nseg, batch * heads), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(dc, meta["BLOCK_C"]), batch * heads, nseg)  # noqa: E731
    g_arg = d_final if d_final is not None else dv
    g_strides = d_final.stride() if d_final is not None else (0, 0, 0, 0)
    strides = (*_rows(q), *_rows(v), dk_parts.stride(0))
    common = dict(NEED_DGAMMA=need_decay, PRECISION=dot_precision(q.dtype), BLOCK_A=pow2(da))
    kernel = _reverse_dgamma_kernel if need_decay else _reverse_kernel
    kernel[grid](q, k, v, do, log_decay, g_arg, dv, dk_parts, local, local_w, d_gamma, seq, heads, da, dc,
                 seg_len, *strides, *g_strides, HAS_G=d_final is not None and nseg == 1, **common)
    if nseg == 1:
        y0, y0_w = local[0], local_w[0]  # the state gradient at position 0 and its position-weighted twin
    else:
        boundary = _reverse_boundary_dgamma_kernel if need_decay else _reverse_boundary_kernel
        boundary[grid](k, v, log_decay, g_arg, local, local_w, dv, dk_parts, d_gamma, seq, heads, da, dc, seg_len,
                       nseg, *strides, *g_strides, HAS_G=d_final is not None, **common)
        # at position 0: Y = lambda^T G + sum_p lambda^(a_p) LOCAL_p,
        # Yw = T lambda^T G + sum_p lambda^(a_p) (LOCALW_p + a_p LOCAL_p)
        starts = (torch.arange(nseg, device=q.device) * seg_len).float()
        weights = torch.exp(log_decay[None, :] * starts[:, None])[:, None, :, None, None]  # [nseg, 1, h, 1, 1]
        y0 = (local * weights).sum(0)
        y0_w = ((local_w + starts[:, None, None, None, None] * local) * weights).sum(0) if need_decay else None
        if d_final is not None:
            tail = torch.exp(log_decay * seq)[None, :, None, None] * d_final.float()
            y0 = y0 + tail
            y0_w = y0_w + seq * tail if need_decay else None
    dk = dk_parts.sum(0) if tiles > 1 else dk_parts[0]
    grad_decay = None
    if need_decay:
        # pairs of the initial state (a key at position -1) with every query: <S0, Yw(0)>
        grad_decay = d_gamma.sum((0, 1)).view(batch, heads).sum(0)
        if initial_state is not None:
            grad_decay = grad_decay + (initial_state.float() * y0_w).sum((0, 2, 3))
    return dk.to(k.dtype), dv, y0, grad_decay


def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a custom op returns for an output that was not asked for (ops cannot return None)."""
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("lctrain::lightning_attention_fwd", mutates_args=())
def lightning_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                               initial_state: torch.Tensor | None,
                               output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernels as a torch custom op: o and the final state (an empty tensor unless asked for)."""
    check_runnable(q, k, v, log_decay)
    o, final = _forward(q, k, v, log_decay, initial_state, v.dtype, output_final_state)
    return o, final if final is not None else _no_tensor(q)


@lightning_attention_fwd_op.register_fake
def _forward_fake(q, k, v, log_decay, initial_state, output_final_state):
    batch, _, heads, dk = q.shape
    final = (q.new_empty((batch, heads, dk, v.shape[-1]), dtype=torch.float32) if output_final_state
             else _no_tensor(q))
    return v.new_empty(v.shape), final


@torch.library.custom_op("lctrain::lightning_attention_bwd", mutates_args=())
def lightning_attention_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                               log_decay: torch.Tensor, d_final: torch.Tensor | None,
                               initial_state: torch.Tensor | None, need_q: bool, need_kv: bool,
                               need_decay: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """The backward kernels as a torch custom op: dq, dk, dv, d initial_state [b, h, dk, dv] float32 and
    d log_decay [h] float32 (empty tensors for what was not asked for)."""
    check_runnable(q, k, v, do, log_decay)
    dq = dk = dv = d_s0 = d_log_decay = None
    if need_q:
        # dq_i = sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S0^T: the forward on (do, v, k)
        s0_t = initial_state.transpose(-1, -2) if initial_state is not None else None  # [b, h, dv, dk]
        dq, _ = _forward(do, v, k, log_decay, s0_t, q.dtype, False)
    if need_kv or need_decay:
        dk, dv, d_s0, d_log_decay = _reverse(q, k, v, do, log_decay, d_final, initial_state, need_decay)
    return tuple(x if x is not None else _no_tensor(q) for x in (dq, dk, dv, d_s0, d_log_decay))


@lightning_attention_bwd_op.register_fake
def _backward_fake(q, k, v, do, log_decay, d_final, initial_state, need_q, need_kv, need_decay):
    batch, _, heads, dk = q.shape
    grads = need_kv or need_decay
    return (q.new_empty(q.shape) if need_q else _no_tensor(q),
            k.new_empty(k.shape) if grads else _no_tensor(q), v.new_empty(v.shape) if grads else _no_tensor(q),
            q.new_empty((batch, heads, dk, v.shape[-1]), dtype=torch.float32) if grads else _no_tensor(q),
            q.new_empty((heads,), dtype=torch.float32) if need_decay else _no_tensor(q))


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, initial_state, _ = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state)


def _autograd_backward(ctx, do, d_final):
    q, k, v, log_decay, initial_state = ctx.saved_tensors
    need_q, need_k, need_v, need_decay, need_s0 = ctx.needs_input_grad[:5]
    d_final = d_final.contiguous() if d_final is not None and d_final.numel() else None
    dq, dk, dv, d_s0, d_decay = lightning_attention_bwd_op(
        q, k, v, do.contiguous(), log_decay, d_final, initial_state, need_q, need_k or need_v or need_s0,
        need_decay)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            d_decay if need_decay else None, d_s0 if need_s0 else None, None)


# Differentiable in q, k, v, log_decay and initial_state.
lightning_attention_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    check_row_stride(q, k, v)
    if initial_state is not None and initial_state.shape != (batch, heads, dk, dv):
        raise ValueError(f"initial_state must have shape [b, h, dk, dv] = {[batch, heads, dk, dv]}; "
                         f"got {tuple(initial_state.shape)}")
    tensors = [q, k, v, log_decay] + ([initial_state] if initial_state is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(t.device) for t in tensors})}")
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = lightning_attention_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(),
                                          log_decay.float().contiguous(), initial_state, output_final_state)
    return o, final if output_final_state else None


def aot_specs(spec_type):
    """The kernels for `lctrain.kernels.aot` (ahead-of-time sm_90 compile), as `spec_type` (its KernelSpec)."""
    consts = lambda d: dict(HAS_X0=True, STORE_XN=True, HAS_G=True, NEED_DGAMMA=True, PRECISION="tf32",  # noqa: E731
                            BLOCK_A=d)
    state = ("LOG_DECAY", "X0", "XN", "LOCAL", "LOCALW", "G", "DKP", "DGAMMA")
    return [spec_type("lightning_fwd", _forward_kernel, ("A", "B", "C", "OUT"), state, consts),
            spec_type("lightning_fwd_boundary", _boundary_kernel, ("A", "OUT"), state, consts),
            spec_type("lightning_bwd", _reverse_kernel, ("Q", "K", "V", "DO", "DV"), state,
                      lambda d: {**consts(d), "NEED_DGAMMA": False}),
            spec_type("lightning_bwd_dgamma", _reverse_dgamma_kernel, ("Q", "K", "V", "DO", "DV"), state, consts),
            spec_type("lightning_bwd_boundary", _reverse_boundary_kernel, ("K", "V", "DV"), state,
                      lambda d: {**consts(d), "NEED_DGAMMA": False}),
            spec_type("lightning_bwd_boundary_dgamma", _reverse_boundary_dgamma_kernel, ("K", "V", "DV"), state,
                      consts)]
