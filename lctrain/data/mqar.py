"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated at any sequence length.

A sample opens with `n` key-value pairs `k1 v1 k2 v2 ...` (distinct keys from the lower half of the
vocabulary, values from the upper half); the rest of the sequence is filler (id 0) in which every key
appears once more, followed by its value. The model is trained and scored only where the input is a
re-appearing key and the label is its value, so it must recall what it saw arbitrarily far back.
Query slots are drawn without replacement with probability ~ gap^(a-1) (Zoology's power law: most
queries come soon after the context, a few far away).

Each sample depends only on (seed, split, index) through its own numpy generator, so any rank can build
any sample, and the stream is the same for every parallel layout.
"""
from __future__ import annotations

import numpy as np
import torch

SPLITS = {"train": 0, "eval": 1}


def mqar_sample(seq_len: int, num_kv_pairs: int, vocab_size: int, rng: np.random.Generator,
                power_a: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """One MQAR sequence.

    Args:
        seq_len: model input length; `seq_len + 1` tokens are drawn (inputs and next-token labels).
        num_kv_pairs: key-value pairs in the context (each queried once).
        vocab_size: ids used: filler 0, keys in [1, vocab_size // 2), values in [vocab_size // 2, vocab_size).
        rng: the sample's generator.
        power_a: power-law exponent of the query positions.
    Returns:
        tokens int64 `[seq_len + 1]` and query_pos int64 `[num_kv_pairs]`: the positions (in tokens) of the
        re-appearing keys; the label there (tokens[pos + 1]) is the key's value.
    """
    n = num_kv_pairs
    half = vocab_size // 2
    ctx = 2 * n
    slots = (seq_len + 1 - ctx) // 2
    if slots < n:
        raise ValueError(f"seq_len={seq_len} has room for {slots} queries, fewer than {n} key-value pairs")
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=True)
    tokens = np.zeros(seq_len + 1, dtype=np.int64)
    tokens[0:ctx:2] = keys
    tokens[1:ctx:2] = values
    p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    slot = rng.choice(slots, size=n, replace=False, p=p / p.sum())
    query_pos = ctx + 2 * slot
    tokens[query_pos] = keys
    tokens[query_pos + 1] = values
    return tokens, np.sort(query_pos)


class MQARDataset:
    """Indexable MQAR stream: `dataset[i]` is sample i of the split (deterministic, any length)."""

    def __init__(self, seq_len: int, num_kv_pairs: int, vocab_size: int = 256, seed: int = 0,
                 split: str = "train", power_a: float = 0.01):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.seq_len, self.num_kv_pairs, self.vocab_size = seq_len, num_kv_pairs, vocab_size
        self.seed, self.split, self.power_a = seed, split, power_a

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], int(index)])
        tokens, query_pos = mqar_sample(self.seq_len, self.num_kv_pairs, self.vocab_size, rng, self.power_a)
        mask = np.zeros(self.seq_len, dtype=np.float32)
        mask[query_pos] = 1.0
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),  # [s]
            "labels": torch.from_numpy(tokens[1:].copy()),  # [s]
            "loss_mask": torch.from_numpy(mask),  # [s], 1 where the label is a recalled value
        }
