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
"""

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
