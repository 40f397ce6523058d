"""`lctrain plot RUN_DIR`: the run's training loss and held-out loss/accuracy curves, as PNG (matplotlib Agg)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lctrain.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of `run_dir/metrics.jsonl` to `out` (default RUN_DIR/plot.png); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir!r} has no metrics.jsonl records to plot")
    out = Path(out) if out is not None else Path(run_dir) / "plot.png"
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
        ax_acc.plot([r["step"] for r in evals], [r["eval_acc"] for r in evals], "o-", color="C2")
    ax_loss.set(xlabel="step", ylabel="loss (mean per scored token)", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="held-out accuracy on scored tokens")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lctrain plot", description="Plot a run's loss/accuracy curves to PNG.")
    parser.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output PNG (default RUN_DIR/plot.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except ValueError as err:
        print(f"lctrain plot: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
