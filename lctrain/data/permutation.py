"""A seeded permutation of range(n) in O(1) memory: a Feistel network with cycle walking.

The data order must be a permutation of the sequences of an epoch, the same on every rank, and cheap to
index at any position (resume continues mid-epoch). Holding `np.random.permutation(n)` costs 8n bytes on
every rank; instead index i is encrypted with a balanced Feistel network over the smallest domain 4^k >= n:

    x = (L, R) (k bits each);  per round j:  (L, R) <- (R, L xor F_j(R)),  F_j(R) = mix64(R xor key_j) mod 2^k

Each round is invertible, so the network is a bijection of [0, 4^k). Values >= n are encrypted again
("cycle walking") until they land in [0, n): the walk stays inside the cycle of the bijection that holds
i, so the result is a bijection of [0, n) (Black & Rogaway 2002). Since 4^k < 4n, a walk takes fewer
than 4 encryptions on average. The round keys come from the seed (any tuple of ints, e.g. (seed, epoch))
through the splitmix64 finaliser; nothing else is stored.
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
ROUNDS = 6


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (a bijection of 64-bit values)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """The same finaliser on a uint64 array (multiplication wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_key(*seed: int) -> int:
    """One 64-bit key from a tuple of non-negative ints (order matters)."""
    key = 0x6C637472  # "lctr"
    for s in seed:
        key = _mix_int(key ^ (int(s) & _M64))
    return key


class Permutation:
    """A bijection of range(n) fixed by `seed`; `perm(i)` or `perm(array)` maps positions to items.

    Args:
        n: domain size (>= 1).
        seed: ints that select the permutation (e.g. the data seed and the epoch).
    """

    def __init__(self, n: int, *seed: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        self.half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)  # 4^k >= n
        base = seed_key(*seed)
        self._keys = [np.uint64(_mix_int(base ^ (j + 1))) for j in range(ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        k = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> k, x & mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << k) | right

    def __call__(self, index):
        """The permuted position(s) of `index` (an int or an integer array), each in [0, n)."""
        arr = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if arr.size and (arr.min() < 0 or arr.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        x = self._encrypt(arr.astype(np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._encrypt(x[out])
            out = x >= np.uint64(self.n)
        x = x.astype(np.int64)
        return int(x[0]) if np.ndim(index) == 0 else x.reshape(np.shape(index))
