"""The agreement table and the fitted weights as a person reads them, and the JSON report."""

from __future__ import annotations

from typing import Any

from steps.publish.cost import JOINTLY
from steps.quality.fit_weights import FitResult


def format_weights(fit: FitResult) -> str:
    lines = [f"fitted weights (scale {fit.choice.scale}, L2 {fit.choice.lam:g}; folds chose "
             + ", ".join(f"{c.scale}/{c.lam:g}" for c in fit.fold_choices) + "):"]  # fmt: skip
    lines += [
        f"  {name:<24} {weight:+.4f}"
        + ("  (scored none of these pairs: weight 0, left out)" if weight == 0 else "")
        for name, weight in fit.weights.items()
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seconds(row: dict[str, Any]) -> str:
    """A labeler's compute time; scores found in the cache say so (the time is from when they were made).

    Labelers scored in one pass with others show an equal share of it (``steps.labelers.joint``).
    """
    if row["seconds"] is None:
        return "-"
    shared = " (shared pass)" if row.get(JOINTLY) else ""
    return f"{row['seconds']:.2f}" + shared + (" (cached)" if row.get("reused") else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "labeler", "n", "agree", "disagree", "tie", "accuracy [95% CI]", "accuracy on decided", "seconds"
    ]  # fmt: skip
    body = [
        [
            r["labeler"], str(r["n"]), str(r["agree"]), str(r["disagree"]), str(r["tie"]),
            f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
            _fmt(r["accuracy_decided"]), _seconds(r),
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
