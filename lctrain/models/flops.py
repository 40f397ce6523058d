"""Parameter count and training FLOPs per token of the hybrid model (for MFU).

Notation: V vocab, H hidden, F ffn hidden, h heads, g kv heads, d = H / h head dim, T sequence length.
Matmul FLOPs are 2 * m * n * k; training = forward + backward = 3 x forward (backward does two matmuls per
forward matmul). Norms, activations, RoPE, the decay and the softmax exponentials are not counted.

Per token, forward:
- every projection: 2 * (its weight's size). Per layer QKV H(h + 2g)d, output hdH, SwiGLU 3HF; linear
  layers also the gate Hhd (if gated). Plus the output layer HV (counted even when tied to the embedding;
  the embedding lookup itself is free).
- softmax layer, causal: q.k and p.v over T/2 keys on average (causal halving; the diagonal ignored):
  2 * 2 * h * d * T / 2 = 2 h d T.
- linear layer (state form, independent of T): the state update k^T v and the read-out q.S, each
  2 * h * d * d: 4 h d^2 (k and v are repeated to the h query heads).

    flops_per_token = 3 * (2 * P_matmul + n_softmax * 2 h d T + n_linear * 4 h d^2)
"""
from __future__ import annotations

from lctrain.models.config import ModelConfig


def _layer_matmul_params(cfg: ModelConfig, mixer: str) -> int:
    h, g, d, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    n = H * (h + g * 2) * d + h * d * H + 3 * H * cfg.ffn_hidden_size
    if mixer == "L" and cfg.linear_output_gate != "none":
        n += H * h * d
    return n


def num_parameters(cfg: ModelConfig) -> int:
    """Parameters of the full model (all TP shards together, tied embeddings counted once)."""
    H = cfg.hidden_size
    n = cfg.vocab_size * H * (1 if cfg.tie_embeddings else 2) + H  # embedding, output layer, final norm
    for mixer in cfg.mixers:
        n += _layer_matmul_params(cfg, mixer) + 2 * H  # projections, two RMSNorm scales
        if mixer == "L" and cfg.linear_output_norm:
            n += cfg.num_heads * cfg.head_dim
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token for sequences of `seq_len` tokens (formula above)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    h, d = cfg.num_heads, cfg.head_dim
    matmul = cfg.hidden_size * cfg.vocab_size + sum(_layer_matmul_params(cfg, m) for m in cfg.mixers)
    mixing = sum(2 * h * d * seq_len if m == "A" else 4 * h * d * d for m in cfg.mixers)
    return float(3 * (2 * matmul + mixing))
