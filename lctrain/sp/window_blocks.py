"""Which part of a ring / all-gather block a sliding window can see (host arithmetic on the chunk layout).

Query at global position i sees keys i - W < j <= i. A block pairs runs of consecutive query positions with runs of
key positions (a rank's chunks: one run contiguous, two zigzag). For one query run [qa, qb) and one key run
[ka, kb) the visible part is

    queries [max(qa, ka), min(qb, kb + W - 1)),   keys [max(ka, qa - W + 1), min(kb, qb))

and nothing when either range is empty. A block's visible part is the bounding box of its runs' visible parts (in
local rows / key offsets): `None` when no run pair is visible -- the block is then skipped, not masked -- and
otherwise only that box is computed, under the window (and document) mask, kept as a `DocumentMask` with
`window=W` (positions and ids; on the GPU branch FlexAttention skips the box's blocks outside the window). Used by
`ring_attention` and `allgather_attention` with `window=`; `halo_attention` needs none of this (it fetches only the
halo).
"""
from __future__ import annotations

import torch

from lctrain.ops.attention_varlen import DocumentMask
from lctrain.ops.attention_window import window_mask
from lctrain.parallel.sharding import chunk_ids

#: A run of consecutive positions: (first local row or key offset, first global position, length).
Run = tuple[int, int, int]


def rank_runs(rank: int, world: int, s_local: int, layout: str) -> list[Run]:
    """The runs of global positions a rank holds, in local row order."""
    chunks = chunk_ids(rank, world, layout) if world > 1 else [0]
    c = s_local // len(chunks)
    return [(m * c, g * c, c) for m, g in enumerate(chunks)]


def restrict(runs: list[Run], rows: slice, total: int) -> list[Run]:
    """The parts of `runs` inside local rows `rows` (a step-1 slice of `total` rows)."""
    lo, hi, _ = rows.indices(total)
    out = []
    for local, pos, n in runs:
        a, b = max(lo, local), min(hi, local + n)
        if a < b:
            out.append((a, pos + a - local, b - a))
    return out


def visible_box(q_runs: list[Run], k_runs: list[Run], window: int) -> tuple[slice, slice] | None:
    """(query rows, key offsets) bounding every visible (query, key) pair of the runs; None: none visible."""
    box = None
    for ql, qa, qn in q_runs:
        for kl, ka, kn in k_runs:
            q0, q1 = max(qa, ka), min(qa + qn, ka + kn + window - 1)
            k0, k1 = max(ka, qa - window + 1), min(ka + kn, qa + qn)
            if q0 >= q1 or k0 >= k1:
                continue
            part = (ql + q0 - qa, ql + q1 - qa, kl + k0 - ka, kl + k1 - ka)
            box = part if box is None else (min(box[0], part[0]), max(box[1], part[1]),
                                            min(box[2], part[2]), max(box[3], part[3]))
    return None if box is None else (slice(box[0], box[1]), slice(box[2], box[3]))


def positions(runs: list[Run], rows: slice, total: int, device: torch.device) -> torch.Tensor:
    """Global positions of local rows `rows`, `[n]` (device arithmetic)."""
    return torch.cat([torch.arange(p, p + n, device=device) for _, p, n in restrict(runs, rows, total)])


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, batch: int, docs=None,
               name: tuple | None = None) -> DocumentMask:
    """The block's window mask (a `DocumentMask`, O(sq + sk)), within documents when `docs` (a `PackedDocuments`)
    is given (then `name`, naming the block within the batch, lets every layer reuse one BlockMask); ids of one row
    broadcast (as views) to `batch` rows without documents."""
    if docs is None:
        return window_mask(q_pos, k_pos, window).batched(batch)
    key = None if name is None else (docs, name)
    return window_mask(q_pos, k_pos, window, docs.ids_at(q_pos), docs.ids_at(k_pos), key)


def window_problem(window: object, causal: bool) -> str | None:
    """What is wrong with a `window=` argument of a softmax SP method, or None."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return f"window must be a positive int (query i sees keys i - W < j <= i), got {window!r}"
    if not causal:
        return "a sliding window is causal (it looks back); pass causal=True with window="
    return None


class WindowBlocks:
    """One rank's window masks for `allgather_attention`: its diagonal chunks and the visible boxes of its remote
    blocks, whose keys are gathered in global order (causal), so a gathered offset is a global position."""

    def __init__(self, rank: int, world: int, s_local: int, layout: str, window: int, batch: int, docs,
                 device: torch.device):
        self.runs, self.s, self.window, self.batch, self.docs, self.device = (
            rank_runs(rank, world, s_local, layout), s_local, window, batch, docs, device)

    def diagonal(self, n: int) -> DocumentMask:
        """Each of the rank's n chunks against itself, stacked along the batch (`n*b` rows)."""
        c = self.s // n
        masks = []
        for m in range(n):
            pos = positions(self.runs, slice(m * c, (m + 1) * c), self.s, self.device)
            masks.append(block_mask(pos, pos, self.window, self.batch, self.docs, ("window-diag", n, m)))
        return DocumentMask.cat(masks)

    def remote(self, rows: slice, start: int, end: int) -> tuple[slice, int, int, DocumentMask] | None:
        """The visible box of local query rows `rows` against gathered keys [start, end), with its mask; None:
        nothing visible (skip the block)."""
        box = visible_box(restrict(self.runs, rows, self.s), [(start, start, end - start)], self.window)
        if box is None:
            return None
        qs, ks = box
        q_pos = positions(self.runs, qs, self.s, self.device)
        k_pos = torch.arange(ks.start, ks.stop, device=self.device)
        return qs, ks.start, ks.stop, block_mask(q_pos, k_pos, self.window, self.batch, self.docs,
                                                 ("window-remote", qs.start, qs.stop, ks.start, ks.stop))
