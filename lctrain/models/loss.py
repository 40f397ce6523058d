"""Language-model loss on vocab-parallel logits, and its exact token mean over the global batch.

The model returns the SUM of masked per-token cross-entropies over this rank's tokens and the number of
tokens (`LMOutput`); :func:`global_token_mean` turns those into the mean over every token of the global
batch (all DP and CP ranks), exactly as one process holding the whole batch would compute it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from lctrain.parallel import comm


@dataclass
class LMOutput:
    """What the model's forward returns."""

    loss_sum: torch.Tensor
    """Scalar: sum over this rank's tokens of loss_mask * cross-entropy (identical on all TP ranks)."""
    num_tokens: torch.Tensor
    """Scalar: loss_mask.sum() over this rank's tokens."""
    predictions: torch.Tensor | None = None
    """int64 `[b, s_local]`: argmax over the full vocabulary, or None when not asked for."""


def vocab_parallel_argmax(logits: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Argmax over the full vocabulary of logits split over TP along the last dim (one all-gather).

    Ties go to the lowest vocabulary id, as `torch.argmax` of the full logits does.

    Args:
        logits: `[..., V / tp]`, this TP rank's contiguous slice of the vocabulary.
        tp_group: the TP group the vocabulary is split over.
    Returns:
        int64 `[...]` global vocabulary ids.
    """
    local_max, local_idx = logits.detach().max(dim=-1)
    tp = comm.group_size(tp_group)
    if tp == 1:
        return local_idx
    offset = comm.group_rank(tp_group) * logits.shape[-1]
    # Values and ids travel in one float64 all-gather (exact for any float logits and any vocab id < 2^53).
    mine = torch.stack([local_max.to(torch.float64), (local_idx + offset).to(torch.float64)])[None]  # [1, 2, ...]
    every = comm.all_gather(mine, group=tp_group, dim=0)  # [tp, 2, ...]
    best_rank = every[:, 0].argmax(dim=0, keepdim=True)  # first rank holding the max = lowest id on ties
    return every[:, 1].gather(0, best_rank)[0].to(torch.int64)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
            tp_group: dist.ProcessGroup | None, return_predictions: bool = False) -> LMOutput:
    """Masked cross-entropy sum of vocab-parallel `logits` `[b, s, V/tp]` against `labels` `[b, s]`.

    The per-token loss is Megatron's `vocab_parallel_cross_entropy` (computed in float32, identical on
    every TP rank). A negative label (the data pipeline's IGNORE_INDEX = -100: a document's last token,
    padding) is not scored: its weight is 0 whatever `loss_mask` says, and it is not counted in `num_tokens`.
    """
    predictions = vocab_parallel_argmax(logits, tp_group) if return_predictions else None
    scored = labels >= 0
    per_token = vocab_parallel_cross_entropy(logits, labels.clamp_min(0))  # [b, s] float32
    # Sum in the logits' precision when it is higher than the float32 per-token loss (float64 tests).
    weight = scored.to(torch.promote_types(logits.dtype, per_token.dtype)) if loss_mask is None else loss_mask * scored
    loss_sum = (per_token * weight).sum()
    num_tokens = weight.sum().to(loss_sum.dtype)
    return LMOutput(loss_sum=loss_sum, num_tokens=num_tokens, predictions=predictions)


class _GlobalTokenMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss_sum, num_tokens, group):
        totals = torch.stack([loss_sum.detach(), num_tokens.detach()]).to(torch.float64)
        totals = comm.all_reduce(totals, group=group)  # [sum of losses, sum of tokens] over the group
        count = totals[1] if totals[1] > 0 else totals.new_tensor(1.0)
        ctx.scale = comm.group_size(group) / count.item()
        return (totals[0] / count).to(loss_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


def global_token_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor,
                      group: dist.ProcessGroup | None) -> torch.Tensor:
    """The mean loss per token over the global batch; one all-reduce of two numbers over `group`.

    Contract (what makes DP x CP training exact): pass the DP x CP group (`mesh.dp_cp_group`), over which
    the weights are replicated and the trainer's engine AVERAGES gradients (divides their sum by W, the
    group's size). With N = sum of num_tokens over the group:

    - value: sum_r loss_sum_r / N on every rank, the number one process holding the whole batch reports;
    - gradient: d out / d loss_sum_r = W / N on rank r (not 1 / N), so after the engine's average
      (1/W) * sum_r (W / N) * d loss_sum_r / d theta = d (sum_r loss_sum_r / N) / d theta,
      the gradient of the global token mean. The CP ranks' partial gradients (each holds different tokens,
      and the SP attention backward already routes cross-rank terms to their owners) are summed by the
      same average, so nothing else is needed. TP ranks are not in the group: each holds identical
      loss_sum and its own shard of the gradient.

    Gradient accumulation: for the exact token mean of the whole step, pass every micro-batch's loss_sum
    with the token count of the whole step (all its micro-batches on this rank) and switch off the
    engine's 1/accumulation scaling; the values of the micro-batches then add up to the step's mean.
    (Passing each micro-batch's own count with the scaling on gives the mean of micro-batch means.)
    With N = 0 the result is 0 (the count is taken as 1). `group=None` is torch's default (world) group;
    a group of one rank, or a single process without torch.distributed, reduces nothing.

    Args:
        loss_sum: scalar, this rank's summed token loss (`LMOutput.loss_sum`), differentiable.
        num_tokens: scalar, this rank's token count (`LMOutput.num_tokens`); not differentiated.
        group: the data-parallel x context-parallel process group.
    Returns:
        Scalar tensor in loss_sum's dtype: the global token mean.
    """
    if loss_sum.dim() != 0 or num_tokens.dim() != 0:
        raise ValueError(f"loss_sum and num_tokens must be scalars, got shapes {tuple(loss_sum.shape)} "
                         f"and {tuple(num_tokens.shape)}")
    return _GlobalTokenMean.apply(loss_sum, num_tokens, group)
