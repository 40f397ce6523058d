"""Text corpora: tokenize files once into memory-mapped shards, then read packed fixed-length samples.

`prepare_text` walks files/folders (sorted, so the result is reproducible), tokenizes each document,
appends the tokenizer's end-of-document id, and writes flat token shards (`shard_NNNNN.bin`, uint16
or uint32) plus `index.json`. `TextDataset` maps the shards without reading them and packs the token
stream into samples of `seq_len + 1` tokens (inputs and next-token labels; documents run into each
other across the separator). The last `eval_fraction` of the samples is held out; the training order is
a fresh permutation per epoch drawn from the data seed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from lctrain.data.tokenizer import get_tokenizer

INDEX = "index.json"
FORMAT = "lctrain-tokens-v1"


def _iter_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            raise ValueError(f"input {item!r} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no input files found in {inputs}")
    return files


def prepare_text(inputs: list[str], out_dir: str, tokenizer: str = "byte",
                 shard_tokens: int = 1 << 24) -> dict:
    """Tokenize `inputs` (files or folders) into shards under `out_dir` (written atomically).

    Args:
        inputs: files and/or directories (read recursively, hidden entries skipped, sorted).
        out_dir: output directory; must not exist yet or hold an earlier index.json (it is replaced).
        tokenizer: "byte" or the path of a local tokenizer.json.
        shard_tokens: tokens per shard file.
    Returns:
        The index (what index.json holds).
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    tok = get_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out = Path(out_dir)
    if out.exists() and not (out / INDEX).is_file():
        raise ValueError(f"{out_dir!r} exists and is not a prepared token directory; refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict] = []
    buf: list[int] = []

    def flush(final: bool) -> None:
        while len(buf) >= shard_tokens or (final and buf):
            chunk, buf[:] = buf[:shard_tokens], buf[shard_tokens:]
            name = f"shard_{len(shards):05d}.bin"
            np.asarray(chunk, dtype=dtype).tofile(tmp / name)
            shards.append({"file": name, "tokens": len(chunk)})

    files = _iter_files(inputs)
    for f in files:
        buf += tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        buf.append(tok.eos_id)
        flush(final=False)
    flush(final=True)
    index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
             "eos_id": tok.eos_id, "total_tokens": sum(s["tokens"] for s in shards), "documents": len(files),
             "shards": shards}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return index


def read_index(path: str) -> dict:
    """The index of a prepared directory; ValueError naming the path when it is missing or malformed."""
    f = Path(path) / INDEX
    if not f.is_file():
        raise ValueError(f"{path!r} is not a prepared text directory (no {INDEX}); run `lctrain data prepare`")
    try:
        index = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{f} is corrupt: {err}") from err
    if index.get("format") != FORMAT:
        raise ValueError(f"{f}: unknown format {index.get('format')!r} (expected {FORMAT})")
    return index


class TextDataset:
    """Packed samples of a prepared corpus: `dataset[i]` is the i-th sample of the split's order."""

    def __init__(self, path: str, seq_len: int, seed: int = 0, split: str = "train", eval_fraction: float = 0.01):
        index = read_index(path)
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self._shards = []
        for s in index["shards"]:
            f = Path(path) / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * np.dtype(index["dtype"]).itemsize:
                raise ValueError(f"token shard {f} is missing or truncated")
            self._shards.append(np.memmap(f, dtype=index["dtype"], mode="r", shape=(s["tokens"],)))
        self._starts = np.cumsum([0] + [s["tokens"] for s in index["shards"]])
        total = int(self._starts[-1])
        n = (total - 1) // seq_len
        n_eval = int(n * eval_fraction) if eval_fraction > 0 else 0
        if eval_fraction > 0 and n > 1:
            n_eval = max(1, n_eval)
        self.n_train, self.n_eval = n - n_eval, n_eval
        count = self.n_train if split == "train" else self.n_eval
        if count < 1:
            raise ValueError(f"{path!r}: {total} tokens give no {split} samples of seq_len={seq_len}")
        self._perm_epoch, self._perm = -1, None

    def _tokens(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            s = int(np.searchsorted(self._starts, pos, side="right") - 1)
            off = pos - int(self._starts[s])
            take = min(length - filled, len(self._shards[s]) - off)
            out[filled:filled + take] = self._shards[s][off:off + take]
            filled, pos = filled + take, pos + take
        return out

    def sample_id(self, index: int) -> int:
        """Which packed sample the split's `index`-th item is (train: permuted per epoch)."""
        if self.split == "eval":
            return self.n_train + index % self.n_eval
        epoch, j = divmod(int(index), self.n_train)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
            self._perm_epoch = epoch
        return int(self._perm[j])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self._tokens(self.sample_id(index) * self.seq_len, self.seq_len + 1)
        return {
            "input_ids": torch.from_numpy(tokens[:-1].copy()),  # [s]
            "labels": torch.from_numpy(tokens[1:].copy()),  # [s]
            "loss_mask": torch.ones(self.seq_len, dtype=torch.float32),
        }
