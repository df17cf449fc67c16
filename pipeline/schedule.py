"""Learning-rate schedule shared by the training stages: linear warmup then cosine decay."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps.

    Linear from 1/(warmup+1) to 1 over ``warmup_steps``, then cosine from 1 down to ``min_lr_ratio`` at
    ``max_steps`` (held there afterwards).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR applying :func:`warmup_cosine_factor` to every param group's own base lr."""
    if warmup_steps < 0 or max_steps < 1 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warmup_cosine needs warmup_steps >= 0, max_steps >= 1, 0 <= min_lr_ratio <= 1; got "
                         f"{warmup_steps}, {max_steps}, {min_lr_ratio}")
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, max_steps, min_lr_ratio))
