"""MQAR recall vs sequence length for several layer patterns, trained in this process; prints a Markdown table.

    python benchmarks/mqar_sweep.py [dotted.key=value ...] [--patterns LL LA] [--seq-lens 64 128 256] \
        [--out-root runs/mqar]

(the overrides come before the options: `--patterns` and `--seq-lens` take every word after them).

Each (pattern, seq_len) cell is one single-process run of `lctrain.train.trainer.run` on configs/demo.yaml
with `parallel.cp=1`, the given overrides, no progress bar, plot or checkpoints, started fresh in
`OUT_ROOT/PATTERN_SEQ`. The table reports the training loss of the last step (metrics.jsonl), the final
held-out loss and held-out recall accuracy (TrainResult.evals), and the wall time.
Every cell gets the same steps, batch and schedule, so the comparison is at equal training budget.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch

from lctrain.config import load_config
from lctrain.parallel import destroy_mesh
from lctrain.train.metrics import read_metrics
from lctrain.train.trainer import run


def run_cell(config: str, pattern: str, seq_len: int, out_root: Path, overrides: list[str]) -> dict:
    """Train one (pattern, seq_len) cell and return its final numbers."""
    run_dir = out_root / f"{pattern}_{seq_len}"
    cfg = load_config(config, ["parallel.cp=1", f"model.layer_pattern={pattern}", f"model.num_layers={len(pattern)}",
                               f"data.seq_len={seq_len}", "train.progress=false", "train.plot=false",
                               "checkpoint.every=0", "checkpoint.at_end=false", f"run.out_dir={run_dir}", *overrides])
    t0 = time.perf_counter()
    result = run(cfg, resume="none")
    wall = time.perf_counter() - t0
    destroy_mesh()  # the next cell builds its own mesh on the same one-process world
    last_eval = result.evals[max(result.evals)]
    train_loss = [r["loss"] for r in read_metrics(run_dir) if "loss" in r][-1]
    return {"pattern": pattern, "seq_len": seq_len, "train_loss": train_loss, "eval_loss": last_eval["eval_loss"],
            "eval_acc": last_eval["eval_acc"], "wall_s": wall}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table, the better accuracy of each sequence length in bold."""
    best = {}
    for r in rows:
        best[r["seq_len"]] = max(best.get(r["seq_len"], 0.0), r["eval_acc"])
    lines = ["| seq_len | pattern | train loss (last step) | held-out loss | held-out recall accuracy | wall s |",
             "|--------:|:-------:|-----------------------:|--------------:|-------------------------:|-------:|"]
    for r in rows:
        acc = f"{r['eval_acc']:.3f}"
        if r["eval_acc"] == best[r["seq_len"]]:
            acc = f"**{acc}**"
        lines.append(f"| {r['seq_len']:>7} | {r['pattern']:^7} | {r['train_loss']:.3f} | {r['eval_loss']:.3f} | "
                     f"{acc} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every cell")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--patterns", nargs="+", default=["LL", "LA"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--out-root", default="runs/mqar")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for seq in args.seq_lens:
        for pattern in args.patterns:
            rows.append(run_cell(args.config, pattern, seq, Path(args.out_root), args.overrides))
            r = rows[-1]
            print(f"{pattern} seq {seq}: acc {r['eval_acc']:.3f} in {r['wall_s']:.0f}s", flush=True)
    print(f"\n{datetime.date.today()}, torch {torch.__version__}, overrides: {' '.join(args.overrides) or '(none)'}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
