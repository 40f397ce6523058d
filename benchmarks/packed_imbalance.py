"""Causal work imbalance across CP ranks for packed documents: global zigzag + document masks vs per-document
zigzag (THD) vs contiguous. Prints the Markdown table of lctrain/sp/README_softmax.md ("Packed documents").

    python benchmarks/packed_imbalance.py        # ~40 s on one CPU core

Work is visible (query, key) pairs per rank (`lctrain.sp.utils.causal_work_per_rank`); each cell is the mean
over 20 random packings of max / mean work across the ranks (1.0 = perfect), with the worst packing in brackets.
"""
from __future__ import annotations

import random
import statistics

from lctrain.sp.utils import causal_work_per_rank

#: (length distribution, mean document length) and (packed sequence length, CP) swept.
DISTRIBUTIONS = (("lognormal", 2048), ("lognormal", 16384), ("pareto", 4096))
SHAPES = ((131072, 8), (131072, 16), (1048576, 32))
LAYOUTS = {"global zigzag": dict(layout="zigzag"), "per-document zigzag": dict(per_document=True),
           "contiguous": dict(layout="contiguous")}


def sample_docs(seq: int, mean: int, rng: random.Random, kind: str) -> list[int]:
    """Document lengths filling one packed sequence (the last one cut at the end).

    lognormal(0, 1) has mean e^0.5 = 1.65 and Pareto(1.2) mean 6, hence the scaling to `mean`.
    """
    docs, left = [], seq
    while left > 0:
        draw = rng.lognormvariate(0, 1.0) * mean / 1.65 if kind == "lognormal" else rng.paretovariate(1.2) * mean / 6
        n = min(max(1, int(draw)), left)
        docs.append(n)
        left -= n
    return docs


def main(packings: int = 20, seed: int = 0) -> None:
    rng = random.Random(seed)
    print("| documents | seq | CP | " + " | ".join(f"{name}: max/mean" for name in LAYOUTS) + " |")
    print("|---|---:|---:|" + "---:|" * len(LAYOUTS))
    for kind, mean in DISTRIBUTIONS:
        for seq, cp in SHAPES:
            ratios: dict[str, list[float]] = {name: [] for name in LAYOUTS}
            for _ in range(packings):
                docs = sample_docs(seq, mean, rng, kind)
                for name, kwargs in LAYOUTS.items():
                    work = causal_work_per_rank(docs, cp, **kwargs)
                    ratios[name].append(max(work) / statistics.mean(work))
            cells = [f"{statistics.mean(r):.3f} (worst {max(r):.3f})" for r in ratios.values()]
            print(f"| {kind}, mean {mean} | {seq} | {cp} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
