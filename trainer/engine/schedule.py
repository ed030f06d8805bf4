"""The learning-rate schedule: linear warmup, then cosine decay to a floor (or constant).

It is a multiplier of the configured lr for torch's `LambdaLR`, a pure function of the step:
DeepSpeed saves the scheduler's step count in checkpoints, so a resumed run (on any number
of ranks) continues the same curve.
"""
from __future__ import annotations

import math
from typing import Callable

from ..config import RunConfig


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio

    def fn(step: int) -> float:
        # `step` counts the optimizer steps taken so far, so the first step already trains at
        # lr / warmup rather than at 0 (a step at lr 0 would be wasted compute).
        if step < warmup:
            return (step + 1) / warmup
        if cfg.train.schedule == "constant":
            return 1.0
        # Clamped: past max_steps the lr stays at the floor instead of climbing back up the cosine.
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
