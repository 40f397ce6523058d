"""The hybrid linear/softmax-attention decoder, tensor parallel (Megatron-core) and context parallel (lctrain.sp).

    from lctrain.models import build_model, HybridLM, ModelConfig
    model = build_model(cfg, mesh, cp_layout="zigzag")
    out = model(input_ids, position_ids, labels, loss_mask)      # LMOutput(loss_sum, num_tokens, predictions)
    loss = global_token_mean(out.loss_sum, out.num_tokens, mesh.dp_cp_group)
"""
from lctrain.models.config import ModelConfig
from lctrain.models.flops import flops_per_token, num_parameters
from lctrain.models.hybrid import HybridLM, build_model
from lctrain.models.loss import LMOutput, global_token_mean

__all__ = ["HybridLM", "LMOutput", "ModelConfig", "build_model", "flops_per_token", "global_token_mean",
           "num_parameters"]
