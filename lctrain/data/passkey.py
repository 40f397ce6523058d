"""Passkey retrieval (Mohtashami & Jaggi 2023): find a number hidden at a random depth in filler text.

The sample is byte text: repeated filler sentences with "The pass key is 12345. Remember it." inserted
at a uniformly random depth, ending with "What is the pass key? The pass key is 12345". Loss and accuracy
cover only the final digits. Each sample depends only on (seed, split, index).
"""
from __future__ import annotations

import numpy as np
import torch

from lctrain.data.mqar import SPLITS

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is {key}"


def min_passkey_len(digits: int) -> int:
    """Shortest `seq_len` that fits the needle and the question."""
    key = "9" * digits
    return len(NEEDLE.format(key=key)) + len(QUESTION.format(key=key))


def passkey_sample(seq_len: int, digits: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One passkey sequence of `seq_len + 1` byte tokens; returns (tokens, number of answer digits at the end)."""
    if seq_len < min_passkey_len(digits):
        raise ValueError(f"seq_len={seq_len} is shorter than a passkey sample needs ({min_passkey_len(digits)})")
    key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    needle, question = NEEDLE.format(key=key), QUESTION.format(key=key)
    room = seq_len + 1 - len(needle) - len(question)
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    depth = int(rng.integers(0, room + 1))
    text = filler[:depth] + needle + filler[depth:] + question
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64), digits


class PasskeyDataset:
    """Indexable passkey stream: `dataset[i]` is sample i of the split."""

    def __init__(self, seq_len: int, digits: int = 5, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.seq_len, self.digits, self.seed, self.split = seq_len, digits, seed, split

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], int(index)])
        tokens, n_answer = passkey_sample(self.seq_len, self.digits, rng)
        mask = np.zeros(self.seq_len, dtype=np.float32)
        mask[-n_answer:] = 1.0
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),  # [s]
            "labels": torch.from_numpy(tokens[1:].copy()),  # [s]
            "loss_mask": torch.from_numpy(mask),  # [s], 1 on the answer digits
        }
