"""The hybrid decoder: Llama-3 blocks whose token mixer is linear or softmax attention, per layer.

    x = embed(input_ids)                      VocabParallelEmbedding (all-reduce over TP)
    for each layer (mixer from the layer pattern):
        x = x + mixer(rmsnorm(x))             LinearAttention (LASP-2/1) | SoftmaxAttention (all-gather/ring/Ulysses;
                                              "W": a sliding window, halo exchange)
        x = x + swiglu(rmsnorm(x))
    logits = rmsnorm(x) W_out^T               ColumnParallelLinear's weight, vocab split over TP (tied: W_out = embedding),
                                              fused with the loss in chunks of tokens (lctrain.models.loss)
    loss_sum = sum(loss_mask * vocab_parallel_cross_entropy(logits, labels))

Packed documents (`cu_seqlens`, see packing.py): RoPE positions restart at every document, every mixer
passes the boundaries to its SP method, and a document's last token is not scored.

Parallelism is read from the mesh: heads, MLP columns and the vocabulary are split over its TP group
(Megatron-core layers), the sequence over its CP group (each rank holds its tokens in the CP layout and
the mixers exchange what they need). Activations between layers are `[b, s_local, hidden]`, replicated
over TP. Weights are drawn from torch's RNG as full matrices on every rank (see tensor_parallel.py), so
seeding torch identically on every rank before :func:`build_model` gives the same full model for any
TP x CP x DP layout.

Activation checkpointing (`activation_checkpointing`, recomputed in backward with torch's non-reentrant
`torch.utils.checkpoint`): "full" keeps only each block's input; "selective" keeps the residual stream and the
norm outputs and recomputes the token mixer and the MLP (their projections, the attention core and the
`[b, s, 2 ffn / tp]` SwiGLU intermediates). Recomputing a mixer re-issues its forward collectives (SP
all-gather / ring / all-to-all, TP all-reduces) during backward: 2x the forward collectives of every
recomputed layer; ranks recompute in the same order, so the collectives still match.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

from lctrain.models.attention import SoftmaxAttention
from lctrain.models.config import ModelConfig
from lctrain.models.flops import flops_per_token, num_parameters
from lctrain.models.gated_linear import GATED_MIXERS, GatedLinearMixer
from lctrain.models.linear_attention import LinearAttention
from lctrain.models.loss import LMOutput, lm_loss_from_hidden
from lctrain.models.mlp import SwiGLU
from lctrain.models.norm import RMSNorm
from lctrain.models.packing import Documents, check_cu_seqlens
from lctrain.models.rope import rope_cos_sin
from lctrain.models.tensor_parallel import megatron_config, normal_init
from lctrain.parallel.mesh import Mesh, get_mesh


class Block(torch.nn.Module):
    """Pre-norm decoder block with a linear ("L"), gated linear ("D", "G"), softmax ("A") or sliding-window
    softmax ("W") token mixer."""

    def __init__(self, cfg: ModelConfig, mixer: str, layer_idx: int, mp: ModelParallelConfig, mesh: Mesh,
                 cp_layout: str):
        super().__init__()
        self.kind = mixer
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if mixer == "L":
            self.mixer = LinearAttention(cfg, mp, mesh, cp_layout, layer_idx)
        elif mixer in GATED_MIXERS:
            self.mixer = GatedLinearMixer(cfg, mp, mesh, cp_layout, mixer)
        elif mixer == "W":
            self.mixer = SoftmaxAttention(cfg, mp, mesh, cp_layout, window=cfg.window_size)
        else:
            self.mixer = SoftmaxAttention(cfg, mp, mesh, cp_layout)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, mp, mesh.tp_group)
        self.recompute = getattr(cfg, "activation_checkpointing", "none")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                docs: Documents | None = None) -> torch.Tensor:
        recompute = self.recompute if torch.is_grad_enabled() else "none"
        if recompute == "full":
            return checkpoint(self._forward, x, cos, sin, "none", docs, use_reentrant=False)
        return self._forward(x, cos, sin, recompute, docs)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, recompute: str,
                 docs: Documents | None = None) -> torch.Tensor:
        h = self.mixer_norm(x)
        x = x + (checkpoint(self.mixer, h, cos, sin, docs, use_reentrant=False) if recompute == "selective"
                 else self.mixer(h, cos, sin, docs))
        h = self.mlp_norm(x)
        return x + (checkpoint(self.mlp, h, use_reentrant=False) if recompute == "selective" else self.mlp(h))


class HybridLM(torch.nn.Module):
    """Decoder-only LM over this rank's tokens; returns the summed loss (see :class:`LMOutput`)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, cp_layout: str = "zigzag"):
        super().__init__()
        cfg.validate_parallel(mesh.tp, mesh.cp, cp_layout)
        # vocab_parallel_cross_entropy reads Megatron's current TP group, so the mesh must be the current one.
        if (not parallel_state.model_parallel_is_initialized()
                or parallel_state.get_tensor_model_parallel_group() is not mesh.tp_group):
            raise ValueError("the mesh given to build_model is not the current one (init_mesh builds a new mesh "
                             "and replaces the previous one); build the model right after init_mesh")
        self.cfg, self.mesh, self.cp_layout = cfg, mesh, cp_layout
        mp = megatron_config(mesh.tp, mesh.cp)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                            config=mp, tp_group=mesh.tp_group)
        self.layers = torch.nn.ModuleList(
            Block(cfg, mixer, i, mp, mesh, cp_layout) for i, mixer in enumerate(cfg.mixers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, config=mp,
                                           init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                           skip_weight_param_allocation=cfg.tie_embeddings, tp_group=mesh.tp_group)
        self.head = FusedOutputLoss(mesh.tp_group)
        # Packed batches: decided here, once, from what each mixer's SP method takes (see packing.py).
        modes = [getattr(layer.mixer, "packed_mode", None) for layer in self.layers]
        unsupported = sorted({f"{type(layer.mixer).__name__} ({getattr(layer.mixer, 'method', '?')})"
                              for layer, mode in zip(self.layers, modes) if mode is None})
        self.packed_problem = None if not unsupported else (
            f"packed documents (cu_seqlens) with CP={mesh.cp}: the SP method of {', '.join(unsupported)} does not "
            "take cu_seqlens= yet; use parallel.cp=1 or data.document_mask=false")
        self._bounds_on_host = "per_document" in modes

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor | None = None, return_predictions: bool = False,
                cu_seqlens: torch.Tensor | Documents | None = None) -> LMOutput:
        """Loss of this rank's tokens.

        Args:
            input_ids: int64 `[b, s_local]`, this CP rank's tokens (from `shard_sequence`).
            position_ids: int64 `[s_local]`, their global positions (from `position_ids()` / `shard_positions()`).
            labels: int64 `[b, s_local]`, the next-token targets of those tokens.
            loss_mask: float `[b, s_local]` weights of the tokens in the loss, or None (all ones).
            return_predictions: also return the argmax over the full vocabulary.
            cu_seqlens: packed documents: int `[n_docs + 1]`, boundaries of the b sequences laid end to end
                (0 ... b * s_global), the same on every rank; a CPU tensor is checked and read without a device
                sync. Or the batch's `Documents` (`lctrain.sp.documents.PackedDocuments.from_host`), built by the
                data path before the step. Negative labels (the data pipeline's ignore index) are never scored.
        Returns:
            LMOutput(loss_sum, num_tokens, predictions); reduce with `lctrain.models.loss.global_token_mean`.
        """
        self._check_inputs(input_ids, position_ids, labels, loss_mask)
        docs = None
        if cu_seqlens is not None:
            if self.packed_problem:
                raise NotImplementedError(self.packed_problem)
            b, s_local = input_ids.shape
            args = (b, s_local * self.mesh.cp, self.mesh.cp_rank, self.mesh.cp, self.cp_layout)
            # Once per batch, for every layer: document ids, positions within documents, starts, ends (no longer
            # scored), from the host boundaries in one host-to-device copy; every mixer gets this one object.
            if isinstance(cu_seqlens, Documents):  # built by the data path already
                docs = cu_seqlens
                problem = docs.problem(input_ids, args[2], args[3], self.cp_layout)
                if problem:
                    raise ValueError(problem)
            elif cu_seqlens.device.type == "cpu":
                check_cu_seqlens(cu_seqlens, *args[:2])
                docs = Documents.from_host(cu_seqlens, *args, device=input_ids.device)
            else:  # already on the device: derived there, sync-free
                check_cu_seqlens(cu_seqlens, *args[:2])
                docs = Documents.on_device(cu_seqlens.to(input_ids.device), *args)
            if docs.bounds is None and self._bounds_on_host:  # the per-document path (one CP rank) reads them
                docs.bounds = docs.cu_seqlens.tolist()
            position_ids, labels = docs.positions, labels.masked_fill(docs.last, -100)
        x = self.embed(input_ids)  # [b, s, hidden]
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)  # [(b,) s, d] each
        for layer in self.layers:
            x = layer(x, cos, sin, docs)
        x = self.norm(x)
        # The output projection fused with the loss, in chunks of tokens: the [b, s, V/tp] logits never exist whole.
        loss_sum, num_tokens, *predictions = self.head(x, self._output_weight(), labels, loss_mask,
                                                       return_predictions)
        return LMOutput(loss_sum, num_tokens, predictions[0] if predictions else None)

    def _output_weight(self) -> torch.nn.Parameter:
        """`[V/tp, hidden]`: the output projection (tied: the embedding)."""
        return self.embed.weight if self.cfg.tie_embeddings else self.output.weight

    def _check_inputs(self, input_ids, position_ids, labels, loss_mask) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_local], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if loss_mask is not None and loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if position_ids.shape != (s,):
            raise ValueError(f"position_ids must be [seq_local] = [{s}], got shape {tuple(position_ids.shape)}")
        if s == 0:
            raise ValueError("empty sequence")
        if self.mesh.cp > 1 and self.cp_layout == "zigzag" and s % 2:
            raise ValueError(f"the zigzag layout needs an even local sequence length (two chunks per CP rank); "
                             f"got {s} tokens on this rank, so the global length {s * self.mesh.cp} is not "
                             f"divisible by 2*CP = {2 * self.mesh.cp}")

    def shared_parameters(self) -> list[tuple[torch.nn.Module, torch.nn.Parameter]]:
        """(module, parameter) pairs where a module reads another module's parameter: the fused output loss
        reads the output projection (tied: the embedding); ZeRO-3 must gather it around that module's forward and
        backward too (see lctrain.train.engine)."""
        return [(self.head, self._output_weight())]

    def num_parameters(self) -> int:
        """Parameters of the full model (not of this rank's shard)."""
        return num_parameters(self.cfg)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`; see flops.py."""
        return flops_per_token(self.cfg, seq_len)


class FusedOutputLoss(torch.nn.Module):
    """The output projection fused with the loss (`lm_loss_from_hidden`), as a module of its own.

    It owns no parameter: the weight is the output layer's (or the tied embedding's), registered with it as a
    ZeRO-3 external parameter, so DeepSpeed gathers the weight around this module's forward and its backward
    (the chunked loss recomputes logits there). Returns a tuple of tensors, (loss_sum, num_tokens[, predictions]),
    because ZeRO-3 hooks the backward of tensor outputs only.
    """

    def __init__(self, tp_group) -> None:
        super().__init__()
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
                return_predictions: bool = False) -> tuple[torch.Tensor, ...]:
        out = lm_loss_from_hidden(x, weight, labels, loss_mask, self.tp_group, return_predictions)
        return (out.loss_sum, out.num_tokens) + ((out.predictions,) if return_predictions else ())


def build_model(cfg: ModelConfig, mesh: Mesh | None = None, cp_layout: str = "zigzag") -> HybridLM:
    """Build the model for `mesh` (default: the current mesh from `init_mesh`), on the CPU in float32.

    Weights come from torch's default RNG as full matrices, so seed it identically on every rank first;
    the full weights are then the same whatever the TP size. Move the model to its device afterwards.

    Raises:
        ValueError: the model does not split over the mesh (heads, kv heads, vocab or ffn not divisible by
            TP; Ulysses heads not divisible by CP; LASP-1 on the zigzag layout), or there is no mesh.
    """
    mesh = mesh if mesh is not None else get_mesh()
    if mesh is None:
        raise ValueError("build_model needs a mesh: call lctrain.parallel.init_mesh() first")
    return HybridLM(cfg, mesh, cp_layout)
