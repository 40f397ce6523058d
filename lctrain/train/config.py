"""Training-loop configuration: optimiser, schedule, batch geometry, precision, logging and eval cadence."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Optimisation and schedule."""

    steps: int = 100
    """Length of the whole training in optimizer steps (defines the LR schedule)."""
    seed: int = 1234
    """Seed of the weight initialisation (torch's RNG); the data order has its own seed (data.seed)."""
    exit_after: int = 0
    """End this run after this many steps (with a checkpoint) without changing the schedule; 0 = never."""
    global_batch_size: int = 8
    """Samples per optimizer step over all DP ranks; fixed across layouts, so a resume under another DP size
    sees the same batches. Gradient accumulation = global_batch_size / (micro_batch_size * dp)."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one DP rank."""
    lr: float = 1e-3
    """Peak learning rate (reached after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup: int = 10
    """Linear warmup steps (from lr/warmup to lr)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (applied to matrices only, not to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (sharded over the DP x CP group, never across TP)."""
    dtype: str = "auto"
    """auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16."""
    log_every: int = 1
    """Write a metrics.jsonl line / TensorBoard point every this many steps."""
    eval_every: int = 0
    """Run the held-out evaluation every this many steps (0 = only at the end)."""
    eval_batches: int = 2
    """Global batches of held-out samples per evaluation."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    plot: bool = False
    """Write the run's loss/accuracy plot (plot.png) at the end."""
    preempt_grace_s: float = 120.0
    """On SIGTERM, finish the step, save a checkpoint and exit 0; give up (exit 1) after this many seconds.
    0 leaves SIGTERM alone (the process dies at once)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged over lctrain's (e.g. {zero_optimization: {overlap_comm: true,
    reduce_bucket_size: 5e7, offload_optimizer: {device: cpu}}}); keys lctrain sets itself are refused."""

    def validate(self) -> None:
        """Raise ValueError for a setting that can't work (no communication)."""
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("exit_after", "warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if self.preempt_grace_s < 0:
            raise ValueError(f"train.preempt_grace_s must be >= 0, got {self.preempt_grace_s}")

    def grad_accum(self, dp: int) -> int:
        """Micro-batches per step on each DP rank; raises ValueError if the batch does not divide."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size * dp = {self.micro_batch_size} * {dp}"
            )
        return self.global_batch_size // per_step
