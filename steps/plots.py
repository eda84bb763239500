"""Pictures for the data card, rendered headless (matplotlib Agg) from the final tables.

Each figure answers one question a person asks of a preference dataset: where
did the prompts go (funnel), what do the signals look like for chosen vs
rejected (distributions), do the signals agree with each other (agreement
matrix), how decisive are the pairs (margins), and is "better" just "longer"
(length vs score).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa

from schemas import columns as c

CHOSEN_COLOUR, REJECTED_COLOUR, DROPPED_COLOUR = "#2a9d8f", "#e76f51", "#8d99ae"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _lengths(table: pa.Table, side: str) -> np.ndarray:
    return np.array([len(conv[0][c.CONTENT]) for conv in table.column(side).to_pylist()], dtype=float)


def funnel(steps: list[tuple[str, int]], drops: dict[str, int]) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    labels, values = zip(*steps, strict=True)
    bars = left.barh(labels[::-1], values[::-1], color=CHOSEN_COLOUR)
    left.bar_label(bars, padding=3)
    left.set_title("Funnel")
    left.margins(x=0.15)
    if drops:
        names, counts = zip(*sorted(drops.items(), key=lambda kv: kv[1]), strict=True)
        bars = right.barh(names, counts, color=DROPPED_COLOUR)
        right.bar_label(bars, padding=3)
        right.margins(x=0.2)
    else:
        right.text(0.5, 0.5, "nothing dropped", ha="center", va="center")
        right.set_axis_off()
    right.set_title("Drops by reason")
    return _png(fig)


def signal_distributions(pairs: pa.Table, signals: list[str]) -> bytes:
    fig, axes = plt.subplots(1, len(signals), figsize=(3.2 * len(signals), 3.0), squeeze=False)
    for ax, signal in zip(axes[0], signals, strict=True):
        for side, colour in ((c.CHOSEN, CHOSEN_COLOUR), (c.REJECTED, REJECTED_COLOUR)):
            values = [v for v in pairs.column(c.signal_column(signal, side)).to_pylist() if v is not None]
            if values:
                ax.hist(values, bins=15, alpha=0.6, color=colour, label=side)
        ax.set_title(signal)
    axes[0][0].legend()
    fig.suptitle("Signal scores of chosen vs rejected (all candidate pairs)")
    return _png(fig)


def agreement_matrix(pairs: pa.Table, signals: list[str]) -> tuple[bytes, dict[str, dict[str, float | None]]]:
    """Share of pairs on which two signals agree about which side is better."""
    directions = {}
    for signal in signals:
        chosen = pairs.column(c.signal_column(signal, c.CHOSEN)).to_numpy(zero_copy_only=False).astype(float)
        rejected = (
            pairs.column(c.signal_column(signal, c.REJECTED)).to_numpy(zero_copy_only=False).astype(float)
        )
        directions[signal] = np.sign(chosen - rejected)
    if c.JUDGE_P_CHOSEN in pairs.column_names and pairs.column(c.JUDGE_P_CHOSEN).null_count < pairs.num_rows:
        p = pairs.column(c.JUDGE_P_CHOSEN).to_numpy(zero_copy_only=False).astype(float)
        directions["pair_judge"] = np.sign(p - 0.5)
    names = list(directions)
    matrix = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            valid = ~np.isnan(directions[a]) & ~np.isnan(directions[b])
            if valid.any():
                matrix[i, j] = float(np.mean(directions[a][valid] == directions[b][valid]))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.8))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(matrix[i, j]):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if matrix[i, j] < 0.6 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("Signals agreeing on direction")
    table = {
        a: {b: (None if np.isnan(matrix[i, j]) else float(matrix[i, j])) for j, b in enumerate(names)}
        for i, a in enumerate(names)
    }
    return _png(fig), table


def margins(kept: pa.Table, dropped: pa.Table) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for table, colour, label in ((kept, CHOSEN_COLOUR, "kept"), (dropped, DROPPED_COLOUR, "dropped")):
        values = [v for v in table.column(c.MARGIN).to_pylist() if v is not None] if table.num_rows else []
        if values:
            ax.hist(values, bins=20, alpha=0.7, color=colour, label=label)
    ax.set_xlabel("margin (aggregate score chosen - rejected)")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title("Margins")
    return _png(fig)


def length_vs_score(pairs: pa.Table) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for side, colour, score in (
        (c.CHOSEN, CHOSEN_COLOUR, c.SCORE_CHOSEN),
        (c.REJECTED, REJECTED_COLOUR, c.SCORE_REJECTED),
    ):
        ax.scatter(
            _lengths(pairs, side), pairs.column(score).to_pylist(), s=14, alpha=0.7, color=colour, label=side
        )
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel("aggregate score")
    ax.legend()
    ax.set_title("Length vs score (all candidate pairs)")
    return _png(fig)


def render_all(
    kept: pa.Table,
    dropped: pa.Table,
    signals: list[str],
    funnel_steps: list[tuple[str, int]],
    drops: dict[str, int],
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every figure as PNG bytes keyed by file name, plus the numbers behind the agreement matrix."""
    candidates = pa.concat_tables([kept, dropped.drop_columns([c.DROP_REASON])]) if dropped.num_rows else kept
    images = {"funnel.png": funnel(funnel_steps, drops)}
    if candidates.num_rows:
        images["signals.png"] = signal_distributions(candidates, signals)
        images["agreement.png"], matrix = agreement_matrix(candidates, signals)
        images["margins.png"] = margins(kept, dropped)
        images["length_vs_score.png"] = length_vs_score(candidates)
    else:
        matrix = {}
    return images, {"agreement_matrix": matrix}
