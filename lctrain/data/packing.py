"""Packing documents into fixed-length sequences (greedy, best-fit, concatenation, or one per sequence).

A document longer than the sequence is first cut into pieces of `seq_len` tokens (the last one shorter);
each piece is a document of its own in the packed sequence. The methods, over the documents in a seeded
random order:

- `best_fit`: best-fit decreasing -- pieces longest first (ties in the random order), each into the open
  sequence whose free space is the smallest that still holds it, else a new sequence. Little padding.
- `greedy`: next-fit -- pieces in order; a piece that does not fit closes the current sequence (its tail
  is padded) and opens the next.
- `concat`: documents end to end, cut wherever a sequence is full (a document may continue in the next
  sequence as a new piece); padding only at the very end.
- `pad`: one piece per sequence, padded (the unpacked baseline).

Only the packed sequence is padded: padding fills the tail of a sequence and is its own document, so no
document length needs to divide anything. The result (a pack index) is written once per (split, method,
seq_len, eval_fraction, seed) under `DIR/packed/` and memory-mapped by every rank:

    seq_offsets.npy  int64 [n_seq + 1]   sequence k holds pieces seq_offsets[k] : seq_offsets[k+1]
    pieces.npy       int64 [n_pieces, 2] (start in the token stream, length), in order inside the sequence
    meta.json        counts: sequences, documents, pieces, tokens, padding
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lctrain.data.permutation import Permutation

METHODS = ("best_fit", "greedy", "concat", "pad")
#: Seed component of the document order used for packing (distinct from the epochs' sequence orders).
PACK_ORDER = 1 << 40


def split_long(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into pieces of at most `seq_len`: (document, start in document, length) per piece."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError("documents must have at least one token")
    counts = -(-lengths // seq_len)  # pieces per document
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(len(doc)) - np.repeat(first, counts)) * seq_len
    return doc, start, np.minimum(lengths[doc] - start, seq_len)


class _FreeSpace:
    """Open sequences by free space, with `smallest_at_least(n)` in O(log seq_len) (a count tree)."""

    def __init__(self, seq_len: int):
        self.size = 1 << (seq_len + 1 - 1).bit_length()
        self.count = [0] * (2 * self.size)
        self.bins: dict[int, list[int]] = {}

    def _add(self, free: int, delta: int) -> None:
        i = free + self.size
        while i:
            self.count[i] += delta
            i //= 2

    def push(self, free: int, bin_id: int) -> None:
        self.bins.setdefault(free, []).append(bin_id)
        self._add(free, 1)

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        """Remove and return (free, bin) with the smallest free >= need, or None."""
        node, lo, hi = 1, 0, self.size - 1
        stack = [(1, 0, self.size - 1)]
        found = -1
        while stack:
            node, lo, hi = stack.pop()
            if hi < need or self.count[node] == 0:
                continue
            if lo == hi:
                found = lo
                break
            mid = (lo + hi) // 2
            stack.append((2 * node + 1, mid + 1, hi))  # right half after the left one
            stack.append((2 * node, lo, mid))
        if found < 0:
            return None
        bin_id = self.bins[found].pop()
        self._add(found, -1)
        return found, bin_id


def pack_pieces(lengths: np.ndarray, seq_len: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pack documents of `lengths` (in the order given) into sequences of `seq_len`.

    Returns:
        seq_offsets int64 [n_seq + 1], and per piece (in sequence order): document index, start within the
        document, length.
    """
    if method not in METHODS:
        raise ValueError(f"packing must be one of {METHODS}, got {method!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if method == "concat":
        ends = np.cumsum(lengths)
        starts = ends - lengths
        total = int(ends[-1]) if len(ends) else 0
        # Cut points: every document start and every multiple of seq_len.
        cuts = np.union1d(starts, np.arange(0, total, seq_len))
        doc = np.searchsorted(ends, cuts, side="right")
        piece_len = np.diff(np.append(cuts, total))
        seq_of_piece = cuts // seq_len
        seq_offsets = np.searchsorted(seq_of_piece, np.arange(-(-total // seq_len) + 1), side="left")
        return seq_offsets.astype(np.int64), doc, cuts - starts[doc], piece_len
    doc, start, plen = split_long(lengths, seq_len)
    if method == "pad":
        return np.arange(len(doc) + 1, dtype=np.int64), doc, start, plen
    if method == "greedy":
        bins: list[list[int]] = []
        fill = seq_len
        for i, n in enumerate(plen.tolist()):
            if fill + n > seq_len:
                bins.append([])
                fill = 0
            bins[-1].append(i)
            fill += n
    else:
        order = np.argsort(-plen, kind="stable")  # longest first, ties in the random document order
        bins, free = [], _FreeSpace(seq_len)
        for i in order.tolist():
            n = int(plen[i])
            hit = free.pop_smallest_at_least(n)
            if hit is None:
                hit = (seq_len, len(bins))
                bins.append([])
            room, b = hit
            bins[b].append(i)
            if room - n > 0:
                free.push(room - n, b)
    flat = np.asarray([i for b in bins for i in b], dtype=np.int64)
    seq_offsets = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
    return seq_offsets, doc[flat], start[flat], plen[flat]


def pack_dir(path: str, seq_len: int, method: str, eval_fraction: float, seed: int, split: str) -> Path:
    return Path(path) / "packed" / f"{split}-{method}-s{seq_len}-e{eval_fraction!r}-seed{seed}"


def build_pack(path: str, index: dict, seq_len: int, method: str, eval_fraction: float, seed: int,
               split: str) -> Path:
    """Pack the split's documents of a prepared directory; writes the pack index (atomically) and returns its dir."""
    from lctrain.data.text import eval_threshold, publish

    out = pack_dir(path, seq_len, method, eval_fraction, seed, split)
    offsets = np.load(Path(path) / "doc_offsets.npy")
    hashes = np.load(Path(path) / "doc_hash.npy")
    held_out = hashes < np.uint64(eval_threshold(eval_fraction))
    docs = np.flatnonzero(held_out if split == "eval" else ~held_out)
    if len(docs):
        docs = docs[Permutation(len(docs), seed, PACK_ORDER)(np.arange(len(docs)))]
    lengths = offsets[docs + 1] - offsets[docs]
    seq_offsets, doc, start, plen = pack_pieces(lengths, seq_len, method)
    pieces = np.stack([offsets[docs[doc]] + start, plen], axis=1).astype(np.int64) if len(doc) else \
        np.zeros((0, 2), dtype=np.int64)
    n_seq = len(seq_offsets) - 1
    meta = {"split": split, "method": method, "seq_len": seq_len, "eval_fraction": eval_fraction, "seed": seed,
            "sequences": n_seq, "documents": len(docs), "pieces": len(plen), "tokens": int(plen.sum()),
            "pad_tokens": int(n_seq * seq_len - plen.sum())}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "seq_offsets.npy", seq_offsets)
    np.save(tmp / "pieces.npy", pieces)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    publish(tmp, out, replace=False)
    return out


def load_pack(path: str, index: dict, seq_len: int, method: str, eval_fraction: float, seed: int,
              split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The split's pack index (built on first use), memory-mapped: (seq_offsets, pieces, meta)."""
    if method not in METHODS:
        raise ValueError(f"data.packing must be one of {METHODS}, got {method!r}")
    d = pack_dir(path, seq_len, method, eval_fraction, seed, split)
    if not (d / "meta.json").is_file():
        d = build_pack(path, index, seq_len, method, eval_fraction, seed, split)
    meta = json.loads((d / "meta.json").read_text())
    return np.load(d / "seq_offsets.npy", mmap_mode="r"), np.load(d / "pieces.npy", mmap_mode="r"), meta
