"""Uncertainty for quality figures: percentile bootstrap CIs over questions (and seeds).

Evaluation results are arrays of per-question scores (an episode's EM, averaged over the samples of
that question): shape [Q] for one run, or [S, Q] for S seeds evaluated on the same Q questions.
Resampling questions (and, for [S, Q], seeds independently of questions) gives a CI that covers both
sources of noise. Differences are paired on questions: before/after, or arm A vs arm B on the same
held-out questions, resample one question index set for both sides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile-bootstrap CI (`level`, default 95 %)."""

    mean: float
    lo: float
    hi: float
    n_questions: int
    n_seeds: int = 1
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def per_question(scores: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Mean score per question id from (question_id, score) pairs (several samples per question)."""
    sums: dict[str, list[float]] = defaultdict(list)
    for qid, s in scores:
        sums[qid].append(float(s))
    return {q: float(np.mean(v)) for q, v in sums.items()}


def _as_2d(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
        raise ValueError(f"bootstrap: expected scores of shape [Q] or [S, Q] with Q, S >= 1, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("bootstrap: scores contain NaN or inf")
    return a


def _replicates(a: np.ndarray, q_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Means of [S, Q] scores over resampled seeds (independently drawn) and the given question draws."""
    n_boot, n_q = q_idx.shape
    s = a.shape[0]
    s_idx = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), dtype=np.int64)
    per_seed = a[:, q_idx]  # [S, B, Q]
    per_seed = per_seed.mean(axis=2)  # [S, B]
    return np.take_along_axis(per_seed.T, s_idx, axis=1).mean(axis=1)  # [B]


def bootstrap_mean(scores, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-question scores ([Q] or [S, Q]) with a percentile-bootstrap CI."""
    a = _as_2d(scores)
    rng = np.random.default_rng(seed)
    q_idx = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))
    reps = _replicates(a, q_idx, rng)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(a.mean()), float(lo), float(hi), a.shape[1], a.shape[0], level)


def bootstrap_diff(a_scores, b_scores, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Estimate:
    """mean(a) − mean(b), paired on questions: both sides use the same resampled question indices
    (columns must be the same questions in the same order); seeds are resampled per side."""
    a, b = _as_2d(a_scores), _as_2d(b_scores)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"bootstrap_diff: the two sides have {a.shape[1]} and {b.shape[1]} questions; "
                         "a paired difference needs the same questions in the same order")
    rng = np.random.default_rng(seed)
    q_idx = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))
    reps = _replicates(a, q_idx, rng) - _replicates(b, q_idx, rng)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(a.mean() - b.mean()), float(lo), float(hi), a.shape[1], max(a.shape[0], b.shape[0]),
                    level)


def align(runs: list[dict[str, float]]) -> tuple[list[str], np.ndarray]:
    """Per-question dicts of several runs (seeds) → (question ids, [S, Q] array) over the shared ids."""
    if not runs:
        raise ValueError("align: no runs")
    common = sorted(set.intersection(*(set(r) for r in runs)))
    if not common:
        raise ValueError("align: the runs share no question ids")
    return common, np.array([[r[q] for q in common] for r in runs], dtype=np.float64)
