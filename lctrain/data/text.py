"""Text corpora: tokenised once into memory-mapped shards with a document index (prepare.py), served as packed samples.

`lctrain data prepare` / :func:`prepare_text` (a pool of processes per node, any number of nodes; see prepare.py)
tokenises each document as `[bos] + encode(text) + [eos]` (ids from the tokenizer) and publishes, with one rename,

    shard_PPPPP_KKK.bin   the token stream (uint8, uint16 or uint32), documents end to end, in file order
    doc_offsets.npy   int64 [n_docs + 1]: where each document starts in the stream (memory-mapped by readers)
    doc_hash.npy      uint64 [n_docs]: a hash of each document's text (chooses its split)
    index.json        format, tokenizer (name, fingerprint, special ids), vocab size, counts, shards

`TextDataset` serves the split's packed sequences (packing.py): `dataset[i]` has `input_ids` and `labels`
`[seq_len]` (labels = the next token of the same document, IGNORE_INDEX at each document's last token and on
padding), `loss_mask` (labels != IGNORE_INDEX) and, with document masking, `cu_seqlens` int32
`[n_docs + 1]` (the document boundaries of the sequence, 0 ... seq_len; padding is its own last document).
A document goes to the eval split when `hash < eval_fraction * 2^64`: by content, so the split of a
document does not depend on the file order or on the other documents (and duplicates share a split).
Training order: epoch e visits the sequences in the order of a seeded O(1)-memory permutation
(`Permutation(n, seed, e)`), so sample i is a pure function of (seed, i) and a resume continues exactly.
In a training job only global rank 0 prepares a missing corpus (and builds a missing pack index); the other
ranks wait for it to be published, then only read (`leader_or_wait`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lctrain.data.permutation import Permutation
from lctrain.data.prepare import FORMAT, INDEX, doc_hash, prepare, publish  # noqa: F401 (re-exported)

#: Label of a position that is not scored (a document's last token, padding); as torch's cross_entropy.
IGNORE_INDEX = -100
#: How long a rank waits for rank 0 to prepare a corpus or build a pack index (LCTRAIN_DATA_WAIT_S overrides).
DATA_WAIT_S = 24 * 3600.0


def eval_threshold(eval_fraction: float) -> int:
    """Documents whose hash is below this are held out."""
    return min(int(eval_fraction * 2.0 ** 64), 2 ** 64 - 1) if eval_fraction > 0 else 0


def leader_or_wait(ready: Callable[[], bool], build: Callable[[], object], what: str) -> None:
    """Run `build` in global rank 0 (or outside a distributed job) unless `ready()`; other ranks poll `ready()`
    until rank 0 has published (a filesystem barrier: preparation can outlast any collective's timeout)."""
    if ready():
        return
    if int(os.environ.get("RANK", "0")) == 0:
        build()
        return
    timeout = float(os.environ.get("LCTRAIN_DATA_WAIT_S", DATA_WAIT_S))
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ.get('RANK')}: {what} did not appear within {timeout:.0f} s "
                               "(rank 0 builds it; is the path on a filesystem every node sees?)")
        time.sleep(1.0)


def prepare_text(inputs: list[str], out_dir: str, tokenizer: str = "byte", shard_tokens: int = 1 << 24,
                 text_field: str = "text", eos_token: str | None = None, bos_token: str | None = None,
                 replace: bool = True, **kwargs) -> dict:
    """Tokenise the documents of `inputs` into shards and a document index under `out_dir` (published atomically);
    see :func:`lctrain.data.prepare.prepare` for the parallel options (workers, node_rank, num_nodes, job_id)."""
    prepare(inputs, out_dir, tokenizer, shard_tokens, text_field, eos_token, bos_token, replace, **kwargs)
    return read_index(out_dir)


def read_index(path: str) -> dict:
    """The index of a prepared directory; ValueError naming the path when it is missing or malformed."""
    f = Path(path) / INDEX
    if not f.is_file():
        raise ValueError(f"{path!r} is not a prepared text directory (no {INDEX}); run `lctrain data prepare`")
    try:
        index = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{f} is corrupt: {err}") from err
    if index.get("format") not in (FORMAT, "lctrain-tokens-v2"):  # v2: the same files, written by one process
        raise ValueError(f"{f}: unknown format {index.get('format')!r} (expected {FORMAT}; "
                         "re-run `lctrain data prepare`)")
    return index


class TokenStore:
    """The memory-mapped token stream of a prepared directory (nothing is read until asked for)."""

    def __init__(self, path: str, index: dict):
        self._shards = []
        for s in index["shards"]:
            f = Path(path) / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * np.dtype(index["dtype"]).itemsize:
                raise ValueError(f"token shard {f} is missing or truncated")
            self._shards.append(np.memmap(f, dtype=index["dtype"], mode="r", shape=(s["tokens"],)))
        self._starts = np.cumsum([0] + [s["tokens"] for s in index["shards"]])
        self.total = int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """int64 tokens [start, start + length) of the stream."""
        if start < 0 or start + length > self.total:
            raise IndexError(f"tokens [{start}, {start + length}) outside the stream of {self.total}")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            s = int(np.searchsorted(self._starts, pos, side="right") - 1)
            off = pos - int(self._starts[s])
            take = min(length - filled, len(self._shards[s]) - off)
            out[filled:filled + take] = self._shards[s][off:off + take]
            filled, pos = filled + take, pos + take
        return out


class TextDataset:
    """Packed sequences of a prepared corpus: `dataset[i]` is the i-th sample of the split's order.

    Args:
        path: the prepared directory.
        seq_len: tokens per sequence.
        seed: seed of the document order in packing and of the per-epoch sequence order.
        split: "train" or "eval".
        eval_fraction: fraction of documents (by content hash) held out for evaluation.
        packing: best_fit | greedy | concat | pad (see packing.py).
        document_mask: emit `cu_seqlens` (documents attend only within themselves; RoPE restarts per document).
    """

    def __init__(self, path: str, seq_len: int, seed: int = 0, split: str = "train", eval_fraction: float = 0.01,
                 packing: str = "best_fit", document_mask: bool = True):
        from lctrain.data.packing import load_pack

        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        index = read_index(path)
        self.seq_len, self.seed, self.split, self.document_mask = seq_len, seed, split, document_mask
        self.pad_id = int(index["pad_id"])
        self._store = TokenStore(path, index)
        self._offsets, self._pieces, self.stats = load_pack(path, index, seq_len, packing, eval_fraction, seed, split)
        self.n = len(self._offsets) - 1
        if self.n < 1:
            raise ValueError(f"{path!r}: no {split} documents with eval_fraction={eval_fraction} "
                             f"({index['documents']} documents in all; the split is by document hash)")
        self._perm_epoch, self._perm = -1, None

    def sample_id(self, index: int) -> int:
        """Which packed sequence the split's `index`-th item is (train: permuted per epoch, O(1) memory)."""
        if self.split == "eval":
            return int(index) % self.n
        epoch, j = divmod(int(index), self.n)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = Permutation(self.n, self.seed, epoch), epoch
        return self._perm(j)

    def sequence(self, k: int) -> dict[str, torch.Tensor]:
        """Packed sequence `k` (in pack order)."""
        s = self.seq_len
        pieces = self._pieces[int(self._offsets[k]):int(self._offsets[k + 1])]  # [n, 2]: (stream start, length)
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        bounds = [0]
        for start, length in pieces.tolist():
            at = bounds[-1]
            tokens[at:at + length] = self._store.read(start, length)
            labels[at:at + length - 1] = tokens[at + 1:at + length]  # the document's last label stays ignored
            bounds.append(at + length)
        if bounds[-1] < s:
            bounds.append(s)  # padding: a document of its own, never scored
        out = {"input_ids": torch.from_numpy(tokens),  # [s]
               "labels": torch.from_numpy(labels),  # [s]
               "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(np.float32))}  # [s]
        if self.document_mask:
            out["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)  # [n_docs + 1]
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.sequence(self.sample_id(index))


def ensure_prepared(cfg) -> dict:
    """The index of `cfg.path` (a DataConfig), preparing it from `cfg.inputs` with `cfg.tokenizer` first when
    it holds no corpus yet; ValueError when it was prepared with another tokenizer than `cfg.tokenizer`."""
    from lctrain.data.tokenizer import tokenizer_fingerprint

    if cfg.inputs:
        leader_or_wait(lambda: (Path(cfg.path) / INDEX).is_file(),
                       lambda: prepare_text(list(cfg.inputs), cfg.path, cfg.tokenizer, text_field=cfg.text_field,
                                            replace=False, workers=max(1, min(8, os.cpu_count() or 1))),
                       f"the prepared corpus {cfg.path}")
    index = read_index(cfg.path)
    if index["tokenizer_fingerprint"] != tokenizer_fingerprint(cfg.tokenizer):
        raise ValueError(f"data.path {cfg.path!r} was prepared with the tokenizer {index['tokenizer']!r}, "
                         f"not data.tokenizer={cfg.tokenizer!r}; set data.tokenizer to the one it was prepared with")
    return index
