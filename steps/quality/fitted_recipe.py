"""Fitted weights as rows beside the single signals, and the recipe file that carries them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from schemas import columns
from schemas.recipe import Recipe, resolve_recipe_path
from steps.pairing.aggregate import (
    Aggregation,
    feature,
    features,
    run_stats,
    wide_scores,
)
from steps.quality.evaluate import Scored, summarise
from steps.quality.fit_weights import FitResult, fit_weights
from steps.quality.pairs_file import Pair, read_pairs
from steps.run.resume import sha256_of


def pair_features(scored: Scored, aggregation: Aggregation) -> np.ndarray:
    """Pairs × signals: each signal's feature difference chosen − rejected, 0 where it scored neither."""
    wide = wide_scores(scored.labels, aggregation.signals, scored.lengths)
    featured = features(wide, aggregation, run_stats(wide, aggregation))
    index = {rid: i for i, rid in enumerate(featured[columns.RESPONSE_ID].to_list())}
    values = featured.select([feature(s) for s in aggregation.signals]).to_numpy().astype(np.float64)
    missing = np.full(len(aggregation.signals), np.nan)
    chosen = np.array([values[index[a]] if a in index else missing for a, _ in scored.sides])
    rejected = np.array([values[index[b]] if b in index else missing for _, b in scored.sides])
    return np.nan_to_num(chosen - rejected, nan=0.0)


def fit_report(
    recipe: Recipe, scored: Scored, seed: int, folds: int, scales: list[str], residual: bool
) -> tuple[list[dict[str, Any]], FitResult]:
    """Equal weights and fitted weights (cross-validated), as rows beside the single signals.

    Every candidate scale gets its own feature matrix; which one the weights use is chosen
    inside the folds, like the L2 strength (``steps.quality.fit_weights``).
    """
    signals = recipe.signals
    equal = dict.fromkeys(signals, 1.0)
    matrices = {scale: pair_features(scored, Aggregation(equal, scale, residual)) for scale in scales}  # type: ignore[arg-type]
    fit = fit_weights(matrices, signals, scored.groups, folds, seed)
    suffix = ", length residual" if residual else ""
    rows = [
        summarise(f"equal weights ({scale}{suffix})", np.sign(x.sum(axis=1)).astype(np.int8), seed)
        for scale, x in matrices.items()
    ]
    fitted = summarise(f"fitted ({folds}-fold CV{suffix})", np.sign(fit.oof_margin).astype(np.int8), seed)
    return [*rows, fitted], fit


def write_recipe(
    recipe_arg: str,
    out: Path,
    fit: FitResult,
    fitted_row: dict[str, Any],
    rows: list[dict[str, Any]],
    residual: bool,
    pairs_path: Path,
    domain: str,
) -> Recipe:
    """The recipe with the fitted weights, scale and length control, and where they came from.

    Starts from the recipe file as written (not a dump of every default), so the result reads
    like the original; YAML comments are lost, so the header says what produced the file.
    """
    source = resolve_recipe_path(recipe_arg)
    data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    for entry in data.get("labelers", []):
        name = entry.get("name") or Recipe.model_validate({"name": "x", "labelers": [entry]}).signals[0]
        entry["weight"] = float(f"{fit.weights[name]:.4g}")
    pairing = data.setdefault("pairing", {})
    pairing["scale"] = fit.choice.scale
    if residual:
        pairing["length_control"] = {**(pairing.get("length_control") or {}), "residual": True}
    singles = [r for r in rows if r["labeler"] in fit.signals]
    best = max(singles, key=lambda r: r["accuracy"])
    equal = next(r for r in rows if r["labeler"].startswith(f"equal weights ({fit.choice.scale}"))
    pairing["weights_fit"] = {
        "pairs": str(pairs_path), "sha256": sha256_of(str(pairs_path)), "domain": domain,
        "n": fitted_row["n"],
        "folds": fit.folds, "cv_accuracy": round(fitted_row["accuracy"], 4),
        "ci_low": round(fitted_row["ci_low"], 4), "ci_high": round(fitted_row["ci_high"], 4),
        "best_single": best["labeler"], "best_single_accuracy": round(best["accuracy"], 4),
        "equal_weights_accuracy": round(equal["accuracy"], 4),
    }  # fmt: skip
    recipe = Recipe.model_validate(data)  # never write a recipe that would not load
    header = (
        f"# Written by `python -m flows.eval_labelers --fit` from {source} and {pairs_path}.\n"
        f"# Weights fitted on {domain!r} pairs; signs need not carry to another domain.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return recipe


def eval_overlap(recipe: Recipe, fitted_on: list[Pair]) -> list[str]:
    """A line per ``eval`` set of ``recipe`` sharing pairs with the fit: its card numbers are in-sample."""
    seen = {(p.pid.split("@")[0], p.chosen, p.rejected) for p in fitted_on}
    lines = []
    for spec in recipe.eval.pairs if recipe.eval is not None else []:
        pairs, _ = read_pairs(spec, spec.limit)
        shared = sum((p.pid.split("@")[0], p.chosen, p.rejected) in seen for p in pairs)
        if shared:
            lines.append(
                f"{shared} of the {len(pairs)} pairs of eval set {spec.label!r} were fitted on, so the "
                "card's numbers for that set are partly in-sample; measure on pairs the fit did not see"
            )
    return lines
