"""Model configuration (the hybrid Llama-3-style decoder)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape of the decoder and the token mixer of each layer."""

    vocab_size: int = 256
    """Vocabulary size (256 = the default byte-level tokenizer)."""
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    """Key/value heads (GQA when fewer than num_heads; must divide it)."""
    ffn_hidden_size: int = 172
    """SwiGLU inner size."""
    layer_pattern: str = "LLLA"
    """Mixer per layer, repeated to num_layers: L = linear attention, A = softmax attention."""
