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
