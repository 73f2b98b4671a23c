"""Learning-rate schedules: each parameter group's LR as a pure function of the optimizer step.

All three start with a linear warmup from 0: step s < W gets base * (s + 1) / W, so the first step
already moves and step W - 1 reaches the base LR. After warmup, with progress p = (s - W) / (N - W):
- constant:   base
- cosine:     base * (m + (1 - m) * (1 + cos(pi p)) / 2), m = min_lr_ratio (the floor)
- converging: target + (base - target) * (1 + cos(pi p)) / 2 — every group ends at the same target
  LR, from above (the connector, 1e-3 -> 3e-5) or from below (the backbones, 1e-5 -> 3e-5).
Steps past N keep the final value. Being a function of the step, the schedule needs no state of its
own in a checkpoint: resuming at step s gives the same LR as the uninterrupted run.
"""

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(total_steps * warmup_ratio)


def lr_at(step: int, base: float, kind: str, total_steps: int, warmup: int, min_lr_ratio: float = 0.1,
          target_lr: float | None = None) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    p = min(max(step - warmup, 0) / span, 1.0)
    wave = 0.5 * (1 + math.cos(math.pi * p))
    if kind == "constant":
        return base
    if kind == "cosine":
        return base * (min_lr_ratio + (1 - min_lr_ratio) * wave)
    if kind == "converging":
        if target_lr is None:
            raise ValueError("the converging schedule needs target_lr")
        return target_lr + (base - target_lr) * wave
    raise ValueError(f"unknown schedule {kind!r}")
