"""Confidence intervals for accuracies measured on the same questions by several training seeds, and
paired comparisons of two variants: the bootstrap the controlled study (scripts/ablate.py) reports.

Data: `correct[s, q]` (bool), seed s's verdict on question q; every variant is scored on the same
questions in the same order, and a seed means the same data order and initial draw in every variant.
An accuracy is the mean over seeds of the per-seed accuracy. Both sources of variation are resampled
together: each bootstrap replicate draws seeds with replacement (training noise) and questions with
replacement (which questions happened to be asked), and recomputes the statistic on that draw. A
paired comparison uses the same draw for both variants (their seed-s runs and the same questions),
so it measures the difference itself, which is far tighter than two overlapping intervals suggest.
The interval is the 2.5th-97.5th percentile of the replicates (95 %); the generator is seeded, so a
report is reproducible.

A measurement with one number per run and no per-question verdicts (the proof of concept's final
validation loss, scripts/poc.py) gets Student's t interval over its seeds instead (`over_seeds`): it
covers training noise only, the held-out clips being the same for every seed.
"""

import functools
import math

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


def _draws(seeds: int, questions: int, replicates: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, seeds, (replicates, seeds)), rng.integers(0, questions, (replicates, questions))


def _replicates(correct: np.ndarray, seed_draw, question_draw) -> np.ndarray:
    """The statistic (mean over the drawn seeds of the accuracy on the drawn questions) per replicate."""
    per_question = np.stack([correct[s][:, q].mean(axis=1) for s, q in zip(seed_draw, question_draw)])
    return per_question.mean(axis=1)


def interval(correct, replicates: int = REPLICATES, seed: int = 0) -> dict:
    """{"mean", "low", "high"}: the accuracy of correct [seeds, questions] and its 95 % interval."""
    correct = np.asarray(correct, dtype=float)
    if correct.ndim != 2 or correct.size == 0:
        raise ValueError(f"correct must be [seeds, questions] and not empty, got shape {correct.shape}")
    stats = _replicates(correct, *_draws(*correct.shape, replicates, seed))
    low, high = np.quantile(stats, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"mean": float(correct.mean()), "low": float(low), "high": float(high)}


def paired(a, b, replicates: int = REPLICATES, seed: int = 0) -> dict:
    """The difference accuracy(a) - accuracy(b) of two variants scored on the same questions by the same
    seeds ([seeds, questions] each), its 95 % interval, and whether the interval excludes 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"a and b must be [seeds, questions] of one shape, got {a.shape} and {b.shape}")
    stats = _replicates(a - b, *_draws(*a.shape, replicates, seed))
    low, high = np.quantile(stats, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"difference": float((a - b).mean()), "low": float(low), "high": float(high),
            "separates": bool(low > 0 or high < 0)}


@functools.lru_cache
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: the x where 1/2 plus the
    density's integral over [0, x] reaches p, by bisection (numpy has no t distribution and scipy is not
    a dependency). Simpson's rule on 2,001 points after x = sinh(u), which spreads the points along
    the heavy tail, is exact to ~1e-9 here."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        u = np.linspace(0.0, math.asinh(x), 2001)
        t = np.sinh(u)
        f = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df)) * np.cosh(u)  # density * dx/du
        h = u[1] - u[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    low, high = 0.0, 1e6
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def over_seeds(values) -> dict:
    """{"mean", "std", "low", "high"}: one number per seed, its sample std and the 95 % t interval of the
    mean (mean -/+ t(0.975, n - 1) * std / sqrt(n)); one seed has no interval (low = high = nan)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be one number per seed, got shape {values.shape}")
    mean = float(values.mean())
    if values.size == 1:
        return {"mean": mean, "std": 0.0, "low": float("nan"), "high": float("nan")}
    std = float(values.std(ddof=1))
    half = t_quantile((1 + LEVEL) / 2, values.size - 1) * std / math.sqrt(values.size)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half}
