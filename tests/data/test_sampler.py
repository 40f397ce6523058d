"""The DP split by global sample index: a partition of each step, independent of the layout."""
import pytest

from lctrain.data.sampler import micro_batch_indices


def _step_indices(step, global_batch, micro, dp):
    accum = global_batch // (micro * dp)
    per_rank = {r: [i for m in range(accum) for i in micro_batch_indices(step * global_batch, micro, dp, r, m)]
                for r in range(dp)}
    return per_rank


@pytest.mark.parametrize("micro,dp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (3, 4)])
def test_each_step_is_a_partition(micro, dp):
    gb = 12 if (12 % (micro * dp) == 0) else micro * dp * 2
    for step in range(3):
        per_rank = _step_indices(step, gb, micro, dp)
        flat = sorted(i for v in per_rank.values() for i in v)
        assert flat == list(range(step * gb, (step + 1) * gb))


def test_resume_under_another_dp_size():
    """Steps 0-1 under dp=2 then 2-3 under dp=4 consume exactly samples 0..4*gb-1, once each."""
    gb = 8
    seen = [i for s in (0, 1) for v in _step_indices(s, gb, 1, 2).values() for i in v]
    seen += [i for s in (2, 3) for v in _step_indices(s, gb, 2, 4).values() for i in v]
    assert sorted(seen) == list(range(4 * gb))


def test_bad_rank():
    with pytest.raises(ValueError):
        micro_batch_indices(0, 1, 2, 2, 0)
