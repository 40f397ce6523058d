"""Model configuration (the hybrid Llama-3-style decoder).

Each layer is a pre-norm block `x + mixer(norm(x))`, `x + mlp(norm(x))` whose token mixer is linear
attention ("L"), softmax attention ("A") or sliding-window softmax attention ("W"), chosen by `layer_pattern`. All-"A" is a plain Llama; all-"L"
is Linear-Llama3 (LASP-2); "LLLA" is a 3:1 hybrid.
"""
from __future__ import annotations

from dataclasses import dataclass

FEATURE_MAPS = ("identity", "elu1", "silu", "relu")
LINEAR_DECAYS = ("none", "lightning", "lightning_depth")
LINEAR_GATES = ("none", "sigmoid", "silu")
SOFTMAX_SP = ("allgather", "ring", "ulysses")
LINEAR_SP = ("lasp2", "lasp1", "lasp2_tree")
WINDOW_SP = ("halo", "allgather", "ring")
MIXERS = ("L", "A", "D", "G", "W")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")


@dataclass
class ModelConfig:
    """Shape of the decoder and the token mixer of each layer."""

    vocab_size: int = 256
    """Vocabulary size (256 = the default byte-level tokenizer); must be divisible by the TP size."""
    hidden_size: int = 64
    """Model width; must be divisible by num_heads (head_dim = hidden_size // num_heads)."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Query heads (split over TP ranks, so divisible by the TP size)."""
    num_kv_heads: int = 4
    """Key/value heads (GQA when fewer than num_heads; must divide it and be divisible by the TP size)."""
    ffn_hidden_size: int = 172
    """SwiGLU inner size (divisible by the TP size)."""
    layer_pattern: str = "LLLA"
    """Mixer per layer, repeated to num_layers: L = linear attention, A = softmax attention, D = GatedDeltaNet,
    G = GLA (gated_linear.py; e.g. "DDDA" is Qwen3-Next's 3:1 GatedDeltaNet:softmax hybrid), W = sliding-window
    softmax attention over the last `window_size` tokens (e.g. "LWLWLA", a BASED-style hybrid)."""
    feature_map: str = "identity"
    """Linear attention's feature map on q and k: identity | elu1 (elu(x)+1) | silu | relu."""
    linear_decay: str = "lightning"
    """Linear attention's per-head decay: "lightning" (fixed per-head lambda as in Lightning Attention /
    TransNormerLLM, from `lctrain.ops.linear_attention.default_log_decay`), "lightning_depth" (the same,
    scaled by TransNormerLLM's depth factor so deeper layers decay less) or "none" (lambda = 1)."""
    linear_output_norm: bool = True
    """RMS-normalise each head's linear-attention output (keeps the unnormalised sums in range)."""
    linear_output_gate: str = "sigmoid"
    """Output gate of the linear mixer, o * act(x W_g): none | sigmoid | silu."""
    rope_theta: float = 500000.0
    """RoPE base of the softmax layers (linear layers carry position through their decay instead)."""
    softmax_sp: str = "allgather"
    """Context-parallel method of the softmax layers: allgather | ring | ulysses."""
    linear_sp: str = "lasp2"
    """Context-parallel method of the linear layers: lasp2 | lasp1 (LASP-1 needs the contiguous layout) |
    lasp2_tree (LASP-2 with the chunk maps folded by a log-depth P2P scan instead of one all-gather:
    `scan="tree"`, lctrain.sp.lasp2_scan)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix; output projections use init_std / sqrt(2 * num_layers)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: none | selective (the token mixer and the MLP of each block) |
    full (whole blocks; only block inputs are kept). Same losses, less activation memory, more compute."""
    short_conv_size: int = 4
    """Kernel of the short causal convolution on q, k, v of the D and G mixers (1: no mixing across tokens)."""
    window_size: int = 512
    """W layers: query i attends keys i - window_size < j <= i (within its document when packed)."""
    window_sp: str = "halo"
    """Context-parallel method of the W layers: halo (only the window's preceding keys travel,
    `lctrain.sp.halo_attention`) | allgather | ring (the full-attention methods, blocks outside the window skipped)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                     "short_conv_size", "window_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if not self.layer_pattern:
            raise ValueError("model.layer_pattern is empty; use e.g. 'LLLA', 'L' or 'A'")
        bad = sorted(set(self.layer_pattern) - set(MIXERS))
        if bad:
            raise ValueError(f"model.layer_pattern {self.layer_pattern!r} has unknown characters {bad}; "
                             "use L (linear attention), A (softmax attention), D (GatedDeltaNet), G (GLA), "
                             "W (sliding-window softmax attention)")
        for name, allowed in (("feature_map", FEATURE_MAPS), ("linear_decay", LINEAR_DECAYS),
                              ("linear_output_gate", LINEAR_GATES), ("softmax_sp", SOFTMAX_SP),
                              ("linear_sp", LINEAR_SP), ("activation_checkpointing", ACTIVATION_CHECKPOINTING),
                              ("window_sp", WINDOW_SP)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mixers(self) -> str:
        """The layer pattern repeated (and cut) to num_layers, one character per layer."""
        reps = -(-self.num_layers // len(self.layer_pattern))
        return (self.layer_pattern * reps)[: self.num_layers]

    def validate_parallel(self, tp: int, cp: int, cp_layout: str) -> None:
        """Check that this model can be split over `tp` TP ranks and `cp` CP ranks in `cp_layout`."""
        for name, size in (("num_heads", self.num_heads), ("num_kv_heads", self.num_kv_heads),
                           ("vocab_size", self.vocab_size), ("ffn_hidden_size", self.ffn_hidden_size)):
            if size % tp:
                raise ValueError(f"model.{name} {size} is not divisible by the TP size {tp}")
        if cp_layout not in ("zigzag", "contiguous"):
            raise ValueError(f"cp_layout must be 'zigzag' or 'contiguous', got {cp_layout!r}")
        if cp > 1 and "A" in self.mixers and self.softmax_sp == "ulysses":
            heads, kv = self.num_heads // tp, self.num_kv_heads // tp
            if heads % cp:
                raise ValueError(f"ulysses needs the heads per TP rank ({self.num_heads}/{tp} = {heads}) "
                                 f"divisible by the CP size {cp}")
            if kv % cp and cp % kv:
                raise ValueError(f"ulysses needs the kv heads per TP rank ({kv}) and the CP size {cp} "
                                 "to divide one another")
        if cp > 1 and "L" in self.mixers and self.linear_sp == "lasp1" and cp_layout != "contiguous":
            raise ValueError("linear_sp='lasp1' needs cp_layout='contiguous' (its state ring follows rank order)")
