"""The hybrid linear/softmax-attention decoder, tensor parallel (Megatron-core) and context parallel (lctrain.sp).

    from lctrain.models import build_model, HybridLM, ModelConfig
    model = build_model(cfg, mesh, cp_layout="zigzag")
    out = model(input_ids, position_ids, labels, loss_mask)      # LMOutput(loss_sum, num_tokens, predictions)
    loss = global_token_mean(out.loss_sum, out.num_tokens, mesh.dp_cp_group)

The names are imported on first use (lctrain._lazy), so reading a config does not import Megatron.
"""
from lctrain._lazy import lazy_exports

_EXPORTS = {"ModelConfig": "lctrain.models.config", "flops_per_token": "lctrain.models.flops",
            "num_parameters": "lctrain.models.flops", "HybridLM": "lctrain.models.hybrid",
            "build_model": "lctrain.models.hybrid", "LMOutput": "lctrain.models.loss",
            "global_token_mean": "lctrain.models.loss"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
