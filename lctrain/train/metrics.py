"""Run observability on rank 0: metrics.jsonl, TensorBoard scalars and a progress bar.

Every rank may call the logger; only rank 0 writes. On resume, lines of metrics.jsonl past the resumed
step (written after the checkpoint by a run that then died) are dropped, so the file stays one line per step.
"""
from __future__ import annotations

import json
from pathlib import Path

#: Peak dense bf16 FLOP/s per GPU, for the MFU estimate (matched against torch.cuda.get_device_name()).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


def peak_flops() -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None (CPU, unknown GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (an empty list if there is none)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes one JSON object per logged step, mirrors it to TensorBoard, and drives a tqdm bar."""

    def __init__(self, run_dir: str | Path, rank: int, start_step: int, total_steps: int, progress: bool):
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self._bar = self._tb = self._file = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.run_dir / "tb"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        """Append `record` (must hold "step") and update TensorBoard and the bar."""
        if not self.active:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, record["step"])
        if self._bar is not None and "loss" in record:
            post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record.get('tokens_per_s', 0):.0f}"}
            if "mfu" in record:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            if "eval_acc" in record:
                post["acc"] = f"{record['eval_acc']:.3f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(record["step"] - self._bar.n)

    def write(self, msg: str) -> None:
        """Print a line on rank 0 without breaking the bar."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.flush()
        self._tb.close()
        self._file.close()
