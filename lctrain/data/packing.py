"""Packing documents into fixed-length sequences (greedy, best-fit, concatenation, or one per sequence).

A document longer than the sequence is first cut into pieces of `seq_len` tokens (the last one shorter);
each piece is a document of its own in the packed sequence. The methods, over the documents in a seeded
random order:

- `best_fit`: best-fit decreasing -- pieces longest first (ties in the random order), each into the open
  sequence whose free space is the smallest that still holds it, else a new sequence. Little padding.
  Vectorised over runs of equal length (`_best_fit`): 10M documents pack in seconds (docs/packed.md).
- `greedy`: next-fit -- pieces in order; a piece that does not fit closes the current sequence (its tail
  is padded) and opens the next.
- `concat`: documents end to end, cut wherever a sequence is full (a document may continue in the next
  sequence as a new piece); padding only at the very end.
- `pad`: one piece per sequence, padded (the unpacked baseline).

Only the packed sequence is padded: padding fills the tail of a sequence and is its own document, so no
document length needs to divide anything. The result (a pack index) is written once per (split, method,
seq_len, eval_fraction, seed) under `DIR/packed/` -- by global rank 0 (`lctrain data pack`, or on first use; the
other ranks wait for it) from the memory-mapped document index, in O(documents) numpy memory -- and
memory-mapped by every rank:

    seq_offsets.npy  int64 [n_seq + 1]   sequence k holds pieces seq_offsets[k] : seq_offsets[k+1]
    pieces.npy       int64 [n_pieces, 2] (start in the token stream, length), in order inside the sequence
    meta.json        counts: sequences, documents, pieces, tokens, padding
"""
from __future__ import annotations

import bisect
import json
import uuid
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


def _next_fit(plen: np.ndarray, seq_len: int) -> np.ndarray:
    """First piece of each sequence under next-fit: a sequence holds pieces i..j-1 while their sum fits
    (one searchsorted on the running sum per sequence)."""
    ends = np.concatenate([[0], np.cumsum(plen)])
    firsts, i, n = [], 0, len(plen)
    while i < n:
        firsts.append(i)
        i = int(np.searchsorted(ends, ends[i] + seq_len, side="right")) - 1
    return np.asarray(firsts, dtype=np.int64)


def _best_fit(plen: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing, vectorised per run of equal lengths: (piece order longest first, its sequence id).

    Pieces of one length L go, one after another, to the open sequence with the least free space f >= L. A
    sequence that receives one keeps the least free space (f - L < f) while f - L >= L, so it takes
    k = f // L of them in a row; sequences with the same free space are interchangeable (first opened, first
    used). So a run of n equal pieces fills whole classes of equal free space, each class with one numpy
    operation, and opens ceil(rest / (seq_len // L)) new sequences at once: the Python loop runs over
    (length, free-space class) visits, not over pieces.
    """
    order = np.argsort(-plen, kind="stable")  # longest first, ties in the given (random) document order
    sizes = plen[order]
    seq_of = np.empty(len(order), dtype=np.int64)
    classes: dict[int, list[np.ndarray]] = {}  # free space -> sequence ids (FIFO chunks)
    keys: list[int] = []  # free-space values with open sequences, sorted
    n_seq = 0

    def push(free: int, ids: np.ndarray) -> None:
        if free <= 0 or not len(ids):
            return
        if free not in classes:
            classes[free] = []
            bisect.insort(keys, free)
        classes[free].append(ids)

    run_starts = np.concatenate([[0], np.flatnonzero(np.diff(sizes)) + 1]).tolist()
    run_ends = run_starts[1:] + [len(sizes)]
    for a, e in zip(run_starts, run_ends):
        size, pos = int(sizes[a]), a
        while pos < e:
            j = bisect.bisect_left(keys, size)
            left = e - pos
            if j == len(keys):  # no open sequence has room: open new ones, seq_len // size pieces each
                k = seq_len // size
                full, rem = divmod(left, k)
                ids = np.arange(n_seq, n_seq + full + (rem > 0), dtype=np.int64)
                seq_of[pos:e] = np.repeat(ids, k)[:left]
                push(seq_len - k * size, ids[:full])
                if rem:
                    push(seq_len - rem * size, ids[full:])
                n_seq += len(ids)
                break
            free = keys[j]
            ids = np.concatenate(classes.pop(free))
            del keys[j]
            k = free // size
            if len(ids) * k <= left:  # the whole class fills up to below `size`
                seq_of[pos:pos + len(ids) * k] = np.repeat(ids, k)
                pos += len(ids) * k
                push(free - k * size, ids)
                continue
            full, rem = divmod(left, k)
            seq_of[pos:pos + full * k] = np.repeat(ids[:full], k)
            seq_of[pos + full * k:e] = ids[full] if rem else 0
            push(free - k * size, ids[:full])
            if rem:
                push(free - rem * size, ids[full:full + 1])
            push(free, ids[full + (rem > 0):])
            pos = e
    return order, seq_of


def best_fit_reference(plen: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing, one piece at a time (the definition `_best_fit` is tested against): the pieces of
    each sequence, by index. Among sequences with the same free space the one that reached it first is used."""
    bins: list[list[int]] = []
    free: list[tuple[int, int, int]] = []  # (free space, arrival, sequence), sorted
    for t, i in enumerate(np.argsort(-np.asarray(plen), kind="stable").tolist()):
        n = int(plen[i])
        j = bisect.bisect_left(free, (n, -1, -1))
        if j == len(free):
            bins.append([])
            room, b = seq_len, len(bins) - 1
        else:
            room, _, b = free.pop(j)
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, t, b))
    return bins


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
        firsts = _next_fit(plen, seq_len)
        seq_offsets = np.append(firsts, len(plen)).astype(np.int64)
        return seq_offsets, doc, start, plen
    order, seq_of = _best_fit(plen, seq_len)
    inside = np.argsort(seq_of, kind="stable")  # a sequence's pieces in the order they were placed
    flat = order[inside]
    seq_offsets = np.concatenate([[0], np.cumsum(np.bincount(seq_of, minlength=int(seq_of.max(initial=-1)) + 1))])
    return seq_offsets.astype(np.int64), doc[flat], start[flat], plen[flat]


def pack_dir(path: str, seq_len: int, method: str, eval_fraction: float, seed: int, split: str) -> Path:
    return Path(path) / "packed" / f"{split}-{method}-s{seq_len}-e{eval_fraction!r}-seed{seed}"


def build_pack(path: str, index: dict, seq_len: int, method: str, eval_fraction: float, seed: int,
               split: str) -> Path:
    """Pack the split's documents of a prepared directory; writes the pack index (atomically) and returns its dir."""
    from lctrain.data.prepare import publish
    from lctrain.data.text import eval_threshold

    out = pack_dir(path, seq_len, method, eval_fraction, seed, split)
    offsets = np.load(Path(path) / "doc_offsets.npy", mmap_mode="r")
    hashes = np.load(Path(path) / "doc_hash.npy", mmap_mode="r")
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
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")  # unique per builder, on any node
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
    from lctrain.data.text import leader_or_wait

    d = pack_dir(path, seq_len, method, eval_fraction, seed, split)
    leader_or_wait(lambda: (d / "meta.json").is_file(),
                   lambda: build_pack(path, index, seq_len, method, eval_fraction, seed, split), f"the pack index {d}")
    meta = json.loads((d / "meta.json").read_text())
    return np.load(d / "seq_offsets.npy", mmap_mode="r"), np.load(d / "pieces.npy", mmap_mode="r"), meta
