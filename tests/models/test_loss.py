"""global_token_mean (value and gradient contract) and the vocab-parallel argmax."""
import pytest
import torch

from lctrain.models.loss import global_token_mean, vocab_parallel_argmax
from lctrain.parallel import MeshConfig, comm, init_mesh
from lctrain.testing import run_distributed


def _token_mean(sums: list[float], counts: list[float]):
    """A weight theta = 1 replicated over the group; rank r's summed loss is theta * sums[r]."""
    rank = comm.group_rank(None)
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss = global_token_mean(theta * sums[rank], torch.tensor(counts[rank], dtype=torch.float64), None)
    loss.backward()
    # What the engine does next: average the weight's gradient over the group.
    averaged = comm.all_reduce(theta.grad.clone(), group=None) / comm.group_size(None)
    return loss.item(), theta.grad.item(), averaged.item()


def test_global_token_mean_value_and_gradient():
    sums, counts = [3.0, 10.0, 0.0, 1.5], [2.0, 5.0, 0.0, 1.0]  # uneven tokens per rank, one rank with none
    for rank, (value, grad, averaged) in enumerate(run_distributed(_token_mean, 4, sums, counts)):
        assert value == pytest.approx(14.5 / 8.0, rel=1e-15)  # the global token mean, on every rank
        assert grad == pytest.approx(4 * sums[rank] / 8.0, rel=1e-15)  # W / N * d loss_sum / d theta
        assert averaged == pytest.approx(14.5 / 8.0, rel=1e-15)  # d (sum / N) / d theta, as one process


def test_global_token_mean_single_process_and_no_tokens():
    loss_sum = torch.tensor(6.0, requires_grad=True)
    loss = global_token_mean(loss_sum, torch.tensor(4.0), None)
    loss.backward()
    assert loss.item() == 1.5 and loss_sum.grad.item() == 0.25
    assert global_token_mean(torch.tensor(0.0), torch.tensor(0.0), None).item() == 0.0
    with pytest.raises(ValueError, match="scalars"):
        global_token_mean(torch.zeros(2), torch.tensor(1.0), None)


def _argmax(logits: torch.Tensor):
    mesh = init_mesh(MeshConfig(tp=comm.group_size(None)))
    local = logits.chunk(mesh.tp, dim=-1)[mesh.tp_rank]
    return vocab_parallel_argmax(local, mesh.tp_group)


def test_vocab_parallel_argmax_matches_full_argmax_with_ties():
    logits = torch.randn(2, 5, 12)
    logits[0, 0, 2] = logits[0, 0, 9] = 10.0  # a tie across TP shards: the lowest id wins
    logits[1, 3, 7] = logits[1, 3, 8] = 10.0  # a tie inside one shard
    for got in run_distributed(_argmax, 2, logits):
        assert torch.equal(got, logits.argmax(-1))
    assert got[0, 0] == 2 and got[1, 3] == 7
    assert torch.equal(vocab_parallel_argmax(logits, None), logits.argmax(-1))


def _loss_case(seed: int, b: int = 2, s: int = 7, hidden: int = 16, vocab: int = 14):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    labels[0, 1] = labels[1, -1] = -100  # not scored
    loss_mask = torch.rand(b, s, generator=gen, dtype=torch.float64)
    return x, weight, labels, loss_mask


def _compare_chunked(seed: int, chunk_tokens: int, tp_group=None, tp: int = 1, tp_rank: int = 0):
    """lm_loss_from_hidden against the definition (float64 cross-entropy of the full logits x W^T): value,
    predictions and the gradients of x and of this rank's weight shard to 1e-12; and against lm_loss (Megatron's
    vocab_parallel_cross_entropy, float32 whatever the input) to float32 precision."""
    from lctrain.models.loss import lm_loss, lm_loss_from_hidden

    x, weight, labels, loss_mask = _loss_case(seed)
    scored = labels >= 0
    xr, wr = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = xr @ wr.t()  # [b, s, V], the whole vocabulary
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none")
    ref_sum = (per_token.view_as(labels) * loss_mask * scored).sum()
    (ref_sum * 0.7).backward()
    ref = (ref_sum.detach(), (loss_mask * scored).sum(), logits.argmax(-1), xr.grad, wr.grad.chunk(tp)[tp_rank])

    xi, wi = x.clone().requires_grad_(True), weight.chunk(tp)[tp_rank].clone().requires_grad_(True)
    out = lm_loss_from_hidden(xi, wi, labels, loss_mask, tp_group, True, chunk_tokens=chunk_tokens)
    (out.loss_sum * 0.7).backward()
    got = (out.loss_sum.detach(), out.num_tokens, out.predictions, xi.grad, wi.grad)
    for name, a, e in zip(("loss_sum", "num_tokens", "predictions", "dx", "dweight"), got, ref):
        if name == "predictions":
            assert torch.equal(a, e), name
        else:
            assert a.dtype == e.dtype and torch.allclose(a, e, rtol=1e-12, atol=1e-12), (name, (a - e).abs().max())
    megatron = lm_loss(x @ weight.chunk(tp)[tp_rank].t(), labels, loss_mask, tp_group)
    assert torch.allclose(megatron.loss_sum, out.loss_sum.detach(), rtol=1e-6), (megatron.loss_sum, out.loss_sum)
    return True


def _chunked_tp(seed: int, chunks: tuple[int, ...]):
    mesh = init_mesh(MeshConfig(tp=comm.group_size(None)))
    for chunk in chunks:
        _compare_chunked(seed + chunk, chunk, mesh.tp_group, mesh.tp, mesh.tp_rank)
    from lctrain.models.loss import lm_loss_from_hidden

    x, weight, labels, _ = _loss_case(seed)
    x.requires_grad_(True)
    with comm.record_comm() as rec:
        lm_loss_from_hidden(x, weight.chunk(mesh.tp)[mesh.tp_rank], labels, None, mesh.tp_group,
                            chunk_tokens=3).loss_sum.backward()
    return rec.summary()


@pytest.mark.parametrize("world", [1, 2])
def test_chunked_loss_matches_lm_loss(world):
    """TP = 1 and 2; 14 tokens in chunks of 1, 4, 14 and 100; the TP reductions do not multiply with the chunks:
    one MAX and one SUM all-reduce forward, one (dx) backward."""
    seed = int(torch.randint(0, 2**31, ()).item())
    for summary in run_distributed(_chunked_tp, world, seed, (1, 4, 14, 100)):
        assert summary == ({} if world == 1 else {"all_reduce": {"calls": 3, "bytes": 14 * 8 * 3 + 14 * 16 * 8}}), \
            summary


def test_chunked_loss_never_holds_the_whole_logits():
    """No tensor of the forward + backward is as large as [tokens, V] (n = 64 tokens, chunks of 8, V = 50)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lctrain.models.loss import lm_loss_from_hidden

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    b, s, hidden, vocab, chunk = 2, 32, 4, 50, 8
    x = torch.randn(b, s, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s))
    with Largest():
        lm_loss_from_hidden(x, weight, labels, None, None, chunk_tokens=chunk).loss_sum.backward()
    assert Largest.numel == chunk * vocab < b * s * vocab, Largest.numel
