"""Parameter count and training FLOPs per token of the hybrid model (for MFU).

Notation: V vocab, H hidden, F ffn hidden, h heads, g kv heads, d = H / h head dim, T sequence length (or
document length, for packed documents), K short-convolution taps. Matmul FLOPs are 2 * m * n * k; training =
forward + backward = 3 x forward (backward does two matmuls per forward matmul). Norms, activations, RoPE,
the gates' elementwise math and the softmax exponentials are not counted.

Per token, forward:
- every projection: 2 * (its weight's size). Per layer QKV H(h + 2g)d, output hdH, SwiGLU 3HF; plus, by mixer,
  L: the output gate Hhd (if gated); D (GatedDeltaNet): beta and decay projections 2Hh, output gate Hhd;
  G (GLA): gate projection Hhd, output gate Hhd. Plus the output layer HV (counted even when tied to the
  embedding; the embedding lookup itself is free).
- D and G: the depthwise causal convolution on q, k, v: 2 K (h + 2g) d.
- softmax layer, causal: q.k and p.v over T/2 keys on average (causal halving; the diagonal ignored):
  2 * 2 * h * d * T / 2 = 2 h d T. Packed documents of length l < T: 2 h d l (attention stays in a document).
  Window layer ("W", window W): min(T, 2W) in place of T (W keys per query once T >> W).
- linear layers in their recurrent (state) form, independent of T, per head:
  L and G: the state update k^T v and the read-out q.S: 2 * 2 d^2 = 4 d^2 (G's gate is a diagonal scale);
  D: the erased value S^T k, the rank-one update k u^T and the read-out q.S: 3 * 2 d^2 = 6 d^2.
  (k and v are repeated to the h query heads.) The chunked kernels execute more than this (intra-chunk
  products); the planner's simulation counts those separately -- MFU's numerator is the model's own count.

    flops_per_token = 3 * (2 * P_matmul + conv + n_A * 2 h d T + (n_L + n_G) * 4 h d^2 + n_D * 6 h d^2)
"""
from __future__ import annotations

from lctrain.models.config import ModelConfig

#: Per-head state FLOPs per token of each linear mixer's recurrence, in units of d^2 (module docstring).
STATE_FLOPS_D2 = {"L": 4, "G": 4, "D": 6}


def _layer_matmul_params(cfg: ModelConfig, mixer: str) -> int:
    h, g, d, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    n = H * (h + g * 2) * d + h * d * H + 3 * H * cfg.ffn_hidden_size
    if mixer == "L" and cfg.linear_output_gate != "none":
        n += H * h * d
    if mixer == "D":
        n += 2 * H * h + H * h * d  # beta, decay; output gate
    if mixer == "G":
        n += 2 * H * h * d  # gate (gk), output gate
    return n


def _layer_other_params(cfg: ModelConfig, mixer: str) -> int:
    """Parameters outside the projections: norm scales, conv taps, per-head decay parameters."""
    h, g, d, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    n = 2 * H  # two RMSNorm scales
    if mixer == "L" and cfg.linear_output_norm:
        n += h * d
    if mixer in ("D", "G"):
        n += (h + 2 * g) * d * cfg.short_conv_size + h * d  # conv taps, per-head output norm
    if mixer == "D":
        n += 2 * h  # A_log, dt_bias
    return n


def num_parameters(cfg: ModelConfig) -> int:
    """Parameters of the full model (all TP shards together, tied embeddings counted once)."""
    H = cfg.hidden_size
    n = cfg.vocab_size * H * (1 if cfg.tie_embeddings else 2) + H  # embedding, output layer, final norm
    for mixer in cfg.mixers:
        n += _layer_matmul_params(cfg, mixer) + _layer_other_params(cfg, mixer)
    return n


def mixing_flops(cfg: ModelConfig, mixer: str, seq_len: int, doc_len: int | None = None) -> float:
    """Forward FLOPs per token of one layer's token mixing beyond its projections (module docstring)."""
    h, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if mixer in ("A", "W"):
        span = min(seq_len, doc_len) if doc_len else seq_len
        # A window layer's query sees min(W, its position + 1) keys: on average ~W for W << T (2 h d * 2 W / 2).
        return 2.0 * h * d * (min(span, 2 * cfg.window_size) if mixer == "W" else span)
    conv = 2.0 * cfg.short_conv_size * (h + 2 * g) * d if mixer in ("D", "G") else 0.0
    return conv + STATE_FLOPS_D2[mixer] * h * d * d


def flops_per_token(cfg: ModelConfig, seq_len: int, doc_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token for sequences of `seq_len` tokens (formula above);
    `doc_len`: packed documents of that length (attention within a document)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if doc_len is not None and doc_len < 1:
        raise ValueError(f"doc_len must be >= 1, got {doc_len}")
    matmul = cfg.hidden_size * cfg.vocab_size + sum(_layer_matmul_params(cfg, m) for m in cfg.mixers)
    mixing = sum(mixing_flops(cfg, m, seq_len, doc_len) for m in cfg.mixers)
    return float(3 * (2 * matmul + mixing))
