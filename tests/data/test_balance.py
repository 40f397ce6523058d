"""The CP load-balance analysis of docs/packed.md counts what the code's layout does."""
import numpy as np

from lctrain.data.balance import packed_bounds, work_global_zigzag, work_per_document_zigzag
from lctrain.parallel.sharding import shard_positions


def test_global_zigzag_work_matches_the_sharding_helper():
    rng = np.random.default_rng(0)
    seq, cp = 48, 3
    bounds = np.unique(np.concatenate([[0, seq], rng.integers(1, seq, size=6)]))
    work = work_global_zigzag(bounds, seq, cp)
    for r in range(cp):
        pos = shard_positions(seq, r, cp, "zigzag").numpy()  # the tokens rank r holds in training
        start = bounds[np.searchsorted(bounds, pos, side="right") - 1]
        assert work[r] == (pos - start + 1).sum()
    assert work.sum() == sum(n * (n + 1) // 2 for n in np.diff(bounds))


def test_one_document_is_balanced_by_either_layout_and_thd_always():
    seq = 64
    for cp in (2, 4):
        w = work_global_zigzag(np.array([0, seq]), seq, cp)
        assert (w == w[0]).all()
        w = work_per_document_zigzag(np.array([0, 5, 6, 40, 64]), cp)  # any lengths: each padded to 2*cp
        assert (w == w[0]).all()
    w = work_global_zigzag(np.array([0, 16, 64]), seq, 2)  # a short document then a long one: rank 0 does more
    assert w[0] > w[1]


def test_packed_bounds_cover_each_sequence():
    lengths = np.array([5, 20, 7, 1, 16, 3])
    for b in packed_bounds(lengths, 16):
        assert b[0] == 0 and b[-1] == 16 and (np.diff(b) > 0).all()
