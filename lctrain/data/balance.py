"""Causal load balance of packed sequences over CP ranks: global zigzag with document masks vs per-document zigzag.

With causal attention inside documents, the query at position i of its document attends to i + 1 keys, so
the attention work of a rank is the sum of (i + 1) over the query tokens it holds. Two ways to lay packed
documents out over P ranks:

- global zigzag with document masks (what lctrain does): the packed sequence of S tokens is cut into 2P
  chunks, rank r holds chunks r and 2P-1-r, whatever the documents; attention is masked per document.
- per-document zigzag (TransformerEngine's THD format): every document is padded to a multiple of 2P,
  cut into 2P chunks, and rank r holds chunks r and 2P-1-r of EVERY document.

    python -m lctrain.data.balance            # the tables of docs/packed.md

prints, for long-tailed (lognormal) document lengths packed with best-fit into sequences of S tokens, the
per-rank work imbalance max_r W_r / mean_r W_r (1 = perfect; the step waits for the slowest rank).
"""
from __future__ import annotations

import argparse

import numpy as np

from lctrain.data.packing import pack_pieces


def _rank_of_chunk(chunk: np.ndarray, cp: int) -> np.ndarray:
    return np.where(chunk < cp, chunk, 2 * cp - 1 - chunk)


def work_global_zigzag(bounds: np.ndarray, seq_len: int, cp: int) -> np.ndarray:
    """Per-rank causal pairs `[cp]` of one packed sequence (document boundaries `bounds`, 0 ... seq_len)."""
    t = np.arange(seq_len)
    doc = np.searchsorted(bounds, t, side="right") - 1
    pairs = t - bounds[doc] + 1  # keys each query attends to
    rank = _rank_of_chunk(t // (seq_len // (2 * cp)), cp)
    return np.bincount(rank, weights=pairs, minlength=cp)


def work_per_document_zigzag(bounds: np.ndarray, cp: int) -> np.ndarray:
    """Per-rank causal pairs `[cp]` when each document (padded to a multiple of 2*cp) is zigzagged on its own.

    The padding tokens at the end of a document are computed like the others (they are part of the kernel's
    causal block), so they count as work.
    """
    work = np.zeros(cp)
    for n in np.diff(bounds).tolist():
        padded = -(-n // (2 * cp)) * (2 * cp)
        i = np.arange(padded)
        rank = _rank_of_chunk(i // (padded // (2 * cp)), cp)
        work += np.bincount(rank, weights=i + 1, minlength=cp)
    return work


def packed_bounds(lengths: np.ndarray, seq_len: int, method: str = "best_fit") -> list[np.ndarray]:
    """Document boundaries of every packed sequence (padding as its own last document)."""
    offsets, _, _, plen = pack_pieces(lengths, seq_len, method)
    out = []
    for a, e in zip(offsets[:-1], offsets[1:]):
        b = np.concatenate([[0], np.cumsum(plen[a:e])])
        out.append(b if b[-1] == seq_len else np.append(b, seq_len))
    return out


def imbalance_table(median: float, sigma: float, seq_len: int, cps: list[int], n_docs: int,
                    seed: int = 0) -> list[dict]:
    """Rows of {cp, scheme, mean and worst max/mean over sequences, THD padding} for one length distribution."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median), sigma, size=n_docs)).astype(np.int64)
    seqs = packed_bounds(lengths, seq_len)
    rows = []
    for cp in cps:
        glob = np.array([work_global_zigzag(b, seq_len, cp) for b in seqs])  # [n_seq, cp]
        perdoc = np.array([work_per_document_zigzag(b, cp) for b in seqs])
        pad = np.mean([sum(-(-n // (2 * cp)) * 2 * cp - n for n in np.diff(b)) / seq_len for b in seqs])
        for name, w in (("global zigzag + document masks", glob), ("per-document zigzag (THD)", perdoc)):
            ratio = w.max(axis=1) / w.mean(axis=1)
            k = len(w) // 8
            batch = w[:8 * k].reshape(k, 8, cp).sum(axis=1)  # micro-batches of 8 sequences: per-rank work adds up
            rows.append({"cp": cp, "scheme": name, "mean": float(ratio.mean()), "worst": float(ratio.max()),
                         "batch": float((batch.max(axis=1) / batch.mean(axis=1)).mean()) if k else float("nan"),
                         "extra_tokens": pad if "THD" in name else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=4000, help="documents drawn per distribution")
    parser.add_argument("--cps", default="2,4,8")
    args = parser.parse_args(argv)
    cps = [int(c) for c in args.cps.split(",")]
    for median, sigma, seq_len in ((600, 1.2, 32768), (600, 1.2, 131072), (8000, 1.5, 131072)):
        n = max(args.docs, int(64 * seq_len / (median * np.exp(sigma ** 2 / 2))))  # about 64 sequences
        print(f"\nlognormal lengths: median {median}, sigma {sigma}; best-fit into S = {seq_len} ({n} documents)\n")
        print("| CP | layout | max/mean per sequence (mean) | (worst) | 8-sequence batch (mean) | THD padding |")
        print("|---|---|---|---|---|---|")
        for r in imbalance_table(median, sigma, seq_len, cps, n):
            print(f"| {r['cp']} | {r['scheme']} | {r['mean']:.3f} | {r['worst']:.3f} | {r['batch']:.3f} | "
                  f"{r['extra_tokens']:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
