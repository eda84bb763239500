"""Learn how much each signal should count from human pairs: regularised logistic regression.

A pair's features are its signals' feature differences chosen − rejected (``steps.pairing.aggregate``),
so the fitted weights plug straight into the pipeline's aggregate: ranking by Σ wᵢ fᵢ is what
the model fitted. The order of each pair was shuffled by a coin flip before scoring, so the
model has no intercept and each pair enters in both orientations (label 1 and its mirror,
label 0), which is the same likelihood without a preferred side.

What is reported is always cross-validated: folds are split by prompt (two pairs about one
conversation never sit on both sides of a split), and the scale and the L2 strength are
chosen inside each training fold (nested), so the held-out accuracy is not tuned on itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.errors import UsageError
from steps.engines import derive_seed

# L2 strengths tried (on features whose typical size is 1); the inner folds pick one.
LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0)
_NEWTON_STEPS = 50


def fit_logistic(x: np.ndarray, lam: float) -> np.ndarray:
    """Weights minimising Σ log(1 + e^(−x·w)) + lam/2 |w|², by Newton's method (convex, a few steps).

    Rows of ``x`` are chosen − rejected differences; all labels are 1, and the mirrored rows
    the no-intercept model implies contribute the same terms, so they need not be added.
    """
    w = np.zeros(x.shape[1])
    for _ in range(_NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))  # P(chosen) under w
        grad = -x.T @ (1.0 - p) + lam * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + lam * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w


def log_loss(x: np.ndarray, w: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -(x @ w))))


def folds_by_group(groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold index per row; rows of one group share a fold; groups are dealt in a seeded order."""
    unique = sorted(set(groups), key=lambda g: (derive_seed("fold", seed, g), g))
    fold_of = {g: i % k for i, g in enumerate(unique)}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


@dataclass(frozen=True)
class Choice:
    scale: str
    lam: float


@dataclass
class FitResult:
    """Fitted weights (on all pairs) plus the honest numbers: out-of-fold margins and per-fold choices."""

    signals: list[str]
    weights: dict[str, float]
    choice: Choice
    folds: int
    oof_margin: np.ndarray  # Σ w·Δf of each pair under the weights fitted without its fold
    fold_choices: list[Choice] = field(default_factory=list)


def _choose(
    matrices: dict[str, np.ndarray], rows: np.ndarray, groups: Sequence[str], k: int, seed: int
) -> Choice:
    """The (scale, lambda) with the lowest inner cross-validated log-loss on ``rows``."""
    inner = folds_by_group([groups[i] for i in rows], k, seed + 1)
    best: tuple[float, Choice] | None = None
    for scale, x in matrices.items():
        for lam in LAMBDAS:
            losses = []
            for fold in range(k):
                train, test = rows[inner != fold], rows[inner == fold]
                if len(train) == 0 or len(test) == 0:
                    continue
                losses.append(log_loss(x[test], fit_logistic(x[train], lam)) * len(test))
            score = sum(losses) / len(rows)
            if best is None or score < best[0] - 1e-12:
                best = (score, Choice(scale, lam))
    assert best is not None
    return best[1]


def fit_weights(
    matrices: dict[str, np.ndarray], signals: list[str], groups: Sequence[str], folds: int = 5, seed: int = 0
) -> FitResult:
    """Nested k-fold fit over the candidate scales (one feature matrix each, pairs × signals).

    Missing features must already be 0 (a signal that did not score a side gives no evidence).
    """
    n = len(groups)
    if n < 2 * folds:
        raise UsageError(
            f"{n} pairs are too few for {folds}-fold cross-validation; give at least {2 * folds}"
        )
    outer = folds_by_group(groups, folds, seed)
    oof = np.zeros(n)
    choices = []
    for fold in range(folds):
        train = np.flatnonzero(outer != fold)
        test = np.flatnonzero(outer == fold)
        choice = _choose(matrices, train, groups, folds, seed)
        choices.append(choice)
        x = matrices[choice.scale]
        oof[test] = x[test] @ fit_logistic(x[train], choice.lam)
    final = _choose(matrices, np.arange(n), groups, folds, seed)
    w = fit_logistic(matrices[final.scale], final.lam)
    weights = {s: float(v) for s, v in zip(signals, w, strict=True)}
    return FitResult(signals, weights, final, folds, oof, choices)
