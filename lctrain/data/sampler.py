"""The data-parallel split, by exact global sample index.

The training stream is one sequence of samples 0, 1, 2, ... (each a pure function of its index). Step t
consumes the `global_batch_size` samples starting at the position `t * global_batch_size`; within a step,
micro-batch m of DP rank r takes

    position + m * (micro * dp) + r * micro  ...  + micro - 1

so the set of samples in a step does not depend on the layout (dp, micro, accumulation), and a resume
under another DP size continues at the same global index: nothing skipped, nothing repeated.
CP and TP ranks of one DP rank read the same samples; each CP rank then keeps its slice of the sequence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from lctrain.data.config import DataConfig


class Dataset(Protocol):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


def micro_batch_indices(position: int, micro: int, dp: int, dp_rank: int, accum_index: int) -> list[int]:
    """Global sample indices of one micro-batch.

    Args:
        position: global index of the first sample of the step.
        micro: samples per micro-batch per DP rank.
        dp: DP size.
        dp_rank: this rank's DP coordinate.
        accum_index: which micro-batch of the step (0 .. accumulation - 1).
    Returns:
        `micro` consecutive global sample indices.
    """
    if not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp})")
    start = position + accum_index * micro * dp + dp_rank * micro
    return list(range(start, start + micro))


def collate(dataset: Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """Stack samples `indices` of `dataset` into a batch (`[b, s]` tensors).

    Packed samples' `cu_seqlens` (`[n_i + 1]` each, 0 ... s) become the boundaries of the b sequences laid
    end to end (int32 `[sum n_i + 1]`, 0 ... b * s), as flash-attn's varlen API takes them.
    """
    samples = [dataset[i] for i in indices]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "cu_seqlens"}
    if "cu_seqlens" in samples[0]:
        s = batch["input_ids"].shape[1]
        batch["cu_seqlens"] = torch.cat([x["cu_seqlens"][:-1] + i * s for i, x in enumerate(samples)]
                                        + [torch.tensor([len(samples) * s], dtype=torch.int32)]).to(torch.int32)
    return batch


def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset of `cfg.source` for `split` ("train" or "eval")."""
    cfg.validate()
    if cfg.source == "mqar":
        from lctrain.data.mqar import MQARDataset

        return MQARDataset(cfg.seq_len, cfg.mqar_num_kv_pairs, cfg.mqar_vocab_size, cfg.seed, split, cfg.mqar_power_a)
    if cfg.source == "passkey":
        from lctrain.data.passkey import PasskeyDataset

        return PasskeyDataset(cfg.seq_len, cfg.passkey_digits, cfg.seed, split)
    from lctrain.data.text import TextDataset, ensure_prepared

    ensure_prepared(cfg)
    return TextDataset(cfg.path, cfg.seq_len, cfg.seed, split, cfg.eval_fraction, cfg.packing, cfg.document_mask)


def data_vocab_size(cfg: DataConfig) -> int:
    """Token ids the source can produce (the model's vocabulary must be at least this)."""
    if cfg.source == "mqar":
        return cfg.mqar_vocab_size
    if cfg.source == "passkey":
        return 256
    from lctrain.data.text import INDEX, read_index
    from lctrain.data.tokenizer import get_tokenizer

    if cfg.inputs and not (Path(cfg.path) / INDEX).is_file():
        return get_tokenizer(cfg.tokenizer).vocab_size  # data.path is prepared from data.inputs at the start
    return int(read_index(cfg.path)["vocab_size"])
