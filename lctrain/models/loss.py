"""Language-model loss on vocab-parallel logits, and its exact token mean over the global batch.

The model returns the SUM of masked per-token cross-entropies over this rank's tokens and the number of
tokens (`LMOutput`); :func:`global_token_mean` turns those into the mean over every token of the global
batch (all DP and CP ranks), exactly as one process holding the whole batch would compute it.

:func:`lm_loss_from_hidden` is what the model calls: the output projection and the vocabulary-parallel
cross-entropy fused and computed in sequence chunks (Liger's fused linear cross-entropy, adapted to a
vocabulary split over TP), so the `[tokens, V/tp]` logits never exist whole -- at Llama-3's 128K vocabulary
and 16K local tokens one float32 copy is 8 GiB. Forward produces and consumes the logits chunk by chunk and
keeps three numbers per token; the TP reductions run once over all tokens (one MAX and one SUM all-reduce,
whatever the number of chunks); backward recomputes each chunk's logits, turns them into the gradient
softmax - onehot and accumulates dW in float32. :func:`lm_loss` (logits given) is its plain reference.
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


#: Tokens per chunk of :func:`lm_loss_from_hidden`: float32 logits of 2048 tokens x 128K vocabulary are 1 GiB.
LOSS_CHUNK_TOKENS = 2048


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
    return _argmax_over_shards(local_max, local_idx, logits.shape[-1], tp_group)


def _argmax_over_shards(local_max: torch.Tensor, local_idx: torch.Tensor, shard: int,
                        tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global argmax from each TP rank's max and arg-max over its `shard` vocabulary ids."""
    tp = comm.group_size(tp_group)
    if tp == 1:
        return local_idx
    offset = comm.group_rank(tp_group) * shard
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


def _logits(x: torch.Tensor, weight: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    # The projection in the activations' dtype (as ColumnParallelLinear), the loss math in float32 (as Megatron's
    # vocab_parallel_cross_entropy; float64 for float64 inputs).
    return (x @ weight.t()).to(cdt)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, tp_group, chunk, want_argmax):
        n, shard = x.shape[0], weight.shape[0]
        cdt = torch.promote_types(x.dtype, torch.float32)
        start = comm.group_rank(tp_group) * shard
        local = labels - start
        mine = (local >= 0) & (local < shard)  # [n]: the target id lies in this rank's vocabulary shard
        local = local.clamp(0, shard - 1)[:, None]
        top = x.new_empty(n, dtype=cdt)
        sum_exp = x.new_empty(n, dtype=cdt)
        target = x.new_empty(n, dtype=cdt)
        arg = x.new_empty(n, dtype=torch.int64) if want_argmax else None
        for i in range(0, n, chunk):
            logits = _logits(x[i:i + chunk], weight, cdt)  # [c, V/tp], the only logits that exist at a time
            top_c, arg_c = logits.max(-1)
            top[i:i + chunk] = top_c
            sum_exp[i:i + chunk] = torch.exp(logits - top_c[:, None]).sum(-1)
            target[i:i + chunk] = logits.gather(-1, local[i:i + chunk])[:, 0]
            if arg is not None:
                arg[i:i + chunk] = arg_c
            del logits
        local_top = top.clone() if want_argmax else None
        target = target * mine
        if comm.group_size(tp_group) > 1:
            glob = comm.all_reduce(top.clone(), op=dist.ReduceOp.MAX, group=tp_group)
            sums = comm.all_reduce(torch.stack([sum_exp * torch.exp(top - glob), target]), group=tp_group)
            top, sum_exp, target = glob, sums[0], sums[1]
        lse = torch.log(sum_exp) + top  # [n]
        ctx.save_for_backward(x, weight, lse, local, mine)
        ctx.tp_group, ctx.chunk = tp_group, chunk
        loss = lse - target
        if want_argmax:
            ctx.mark_non_differentiable(local_top, arg)
            return loss, local_top, arg
        return loss

    @staticmethod
    def backward(ctx, d_loss, *_):
        x, weight, lse, local, mine = ctx.saved_tensors
        cdt = lse.dtype
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if need_x else None
        # dW sums over chunks in float32 (one chunk: the matmul's own result, in the weight's dtype).
        several = x.shape[0] > ctx.chunk
        dw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w and several else None
        hot = mine.to(cdt)[:, None]
        for i in range(0, x.shape[0], ctx.chunk):
            xc = x[i:i + ctx.chunk]
            # d loss_t / d logits_t = softmax(logits_t) - onehot(label_t), scaled by the token's incoming gradient.
            g = torch.exp(_logits(xc, weight, cdt) - lse[i:i + ctx.chunk, None])
            g.scatter_add_(-1, local[i:i + ctx.chunk], -hot[i:i + ctx.chunk])
            g = (g * d_loss[i:i + ctx.chunk, None]).to(x.dtype)  # [c, V/tp]
            if need_x:
                dx[i:i + ctx.chunk] = g @ weight
            if need_w:
                if several:
                    dw += g.t() @ xc  # in-place type promotion: no float32 copy of the chunk's [V/tp, hidden]
                else:
                    dw = g.t() @ xc
            del g
        if need_x and comm.group_size(ctx.tp_group) > 1:
            dx = comm.all_reduce(dx, group=ctx.tp_group)  # the input is replicated over TP: sum its gradients
        return dx, (dw.to(weight.dtype) if need_w else None), None, None, None, None


def lm_loss_from_hidden(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss_mask: torch.Tensor | None, tp_group: dist.ProcessGroup | None,
                        return_predictions: bool = False, chunk_tokens: int | None = None) -> LMOutput:
    """:func:`lm_loss` of the logits `x W^T`, computed in chunks of tokens (see the module docstring).

    Args:
        x: `[b, s, hidden]`, the final hidden states (replicated over TP; their gradient is all-reduced over
            `tp_group` here, as ColumnParallelLinear's input would be).
        weight: `[V/tp, hidden]`, this TP rank's contiguous slice of the output projection (or tied embedding).
        labels, loss_mask, tp_group, return_predictions: as :func:`lm_loss`.
        chunk_tokens: tokens per chunk (default `LOSS_CHUNK_TOKENS`).
    Returns:
        LMOutput, equal to `lm_loss(x @ weight.T, ...)`.
    """
    if x.dim() != 3 or weight.dim() != 2 or x.shape[-1] != weight.shape[-1] or labels.shape != x.shape[:2]:
        raise ValueError(f"lm_loss_from_hidden: x [b, s, hidden], weight [V/tp, hidden], labels [b, s] expected, "
                         f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    chunk = chunk_tokens or LOSS_CHUNK_TOKENS
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk}")
    b, s, hidden = x.shape
    scored = labels >= 0
    out = _ChunkedVocabParallelCE.apply(x.reshape(b * s, hidden), weight, labels.clamp_min(0).reshape(-1), tp_group,
                                        chunk, return_predictions)
    per_token, predictions = (out[0], _argmax_over_shards(out[1], out[2], weight.shape[0], tp_group)
                              ) if return_predictions else (out, None)
    per_token = per_token.view(b, s)
    weight_t = scored.to(per_token.dtype) if loss_mask is None else loss_mask * scored
    loss_sum = (per_token * weight_t).sum()
    num_tokens = weight_t.sum().to(loss_sum.dtype)
    return LMOutput(loss_sum=loss_sum, num_tokens=num_tokens,
                    predictions=None if predictions is None else predictions.view(b, s))


class _GlobalTokenMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss_sum, num_tokens, group):
        totals = torch.stack([loss_sum.detach(), num_tokens.detach()]).to(torch.float64)
        totals = comm.all_reduce(totals, group=group)  # [sum of losses, sum of tokens] over the group
        # On the device, no host read: N = 0 counts as 1 (the loss is then 0).
        count = torch.where(totals[1] > 0, totals[1], torch.ones_like(totals[1]))
        ctx.save_for_backward(comm.group_size(group) / count)
        return (totals[0] / count).to(loss_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None, None


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
