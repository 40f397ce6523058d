"""Packing documents into sequences: no token lost, no sequence overfull, padding only where the method says."""
import numpy as np
import pytest
import torch

from lctrain.data.packing import METHODS, pack_pieces
from lctrain.data.sampler import collate

SEQ = 16


def _lengths(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(2.0, 1.0, size=200).astype(np.int64))
    lengths[:5] = [1, 1, SEQ, SEQ + 1, 3 * SEQ + 5]  # single tokens, exact fits, longer than a sequence
    return rng.permutation(lengths)


@pytest.mark.parametrize("method", METHODS)
def test_every_token_once_in_order(method):
    lengths = _lengths(1)
    offsets, doc, start, plen = pack_pieces(lengths, SEQ, method)
    assert offsets[0] == 0 and offsets[-1] == len(doc) and (np.diff(offsets) >= 1).all()
    fill = np.add.reduceat(plen, offsets[:-1])
    assert (fill <= SEQ).all() and (plen >= 1).all()
    # Each document is covered exactly once by its pieces, in order, without gaps.
    for d in range(len(lengths)):
        mine = np.flatnonzero(doc == d)
        got = sorted(zip(start[mine].tolist(), plen[mine].tolist()))
        ends = [s + n for s, n in got]
        assert got[0][0] == 0 and ends[-1] == lengths[d] and [s for s, _ in got[1:]] == ends[:-1]
    pad = len(fill) * SEQ - lengths.sum()
    if method == "concat":
        assert pad < SEQ and (fill[:-1] == SEQ).all()  # padding only at the very end
    if method == "pad":
        assert (np.diff(offsets) == 1).all()  # one piece per sequence
    if method == "best_fit":
        # best fit needs no more sequences than next-fit, and stays within 2% of the lower bound here
        assert len(fill) <= len(pack_pieces(lengths, SEQ, "greedy")[0]) - 1
        assert len(fill) <= 1.02 * np.ceil(lengths.sum() / SEQ) + 1


def test_greedy_is_next_fit():
    offsets, doc, _, plen = pack_pieces([5, 9, 3, 4, 16, 1], SEQ, "greedy")
    assert [doc[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [[0, 1], [2, 3], [4], [5]]


def test_best_fit_fills_the_tightest_gap():
    offsets, doc, _, _ = pack_pieces([10, 9, 6, 7], SEQ, "best_fit")
    assert [sorted(doc[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])] == [[0, 2], [1, 3]]


def test_bad_method():
    with pytest.raises(ValueError, match="packing must be one of"):
        pack_pieces([3], SEQ, "first_fit")


class _Packed:
    def __init__(self, bounds):
        self.bounds = bounds

    def __getitem__(self, i):
        return {"input_ids": torch.full((8,), i), "cu_seqlens": torch.tensor(self.bounds[i], dtype=torch.int32)}


def test_collate_lays_sequences_end_to_end():
    batch = collate(_Packed({0: [0, 3, 8], 1: [0, 8], 2: [0, 1, 2, 7, 8]}), [0, 1, 2])
    assert batch["input_ids"].shape == (3, 8)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 16, 17, 18, 23, 24]
