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
import fsspec
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import columns
from schemas.records import conform

CHOSEN_COLOUR, REJECTED_COLOUR, DROPPED_COLOUR = "#2a9d8f", "#e76f51", "#8d99ae"


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


PLOT_BATCH_ROWS = 8192  # pair rows whose texts are held at once while measuring their lengths


def length_column(side: str) -> str:
    """A working column: characters in a side's first message (the plots need lengths, not texts)."""
    return f"{side}:length"


def plot_columns(signals: list[str]) -> list[str]:
    """The numeric pair columns the figures draw."""
    names = [columns.SCORE_CHOSEN, columns.SCORE_REJECTED, columns.MARGIN, columns.JUDGE_P_CHOSEN]
    for signal in signals:
        names += [
            columns.signal_column(signal, columns.CHOSEN),
            columns.signal_column(signal, columns.REJECTED),
        ]
    return names


def _first_lengths(conversations: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    first = pc.struct_field(pc.list_element(conversations, 0), columns.CONTENT)
    return pc.utf8_length(first).cast(pa.float64())


def read_plot_table(uris: list[str], schema: pa.Schema, signals: list[str]) -> pa.Table:
    """What the figures need from pair files, read batch by batch: the numbers and text lengths.

    A pair table's texts are most of its bytes; only one batch of them is held at a time,
    so the memory for the figures grows with numbers per pair, not with the texts.
    """
    numeric = plot_columns(signals)
    sides = (columns.CHOSEN, columns.REJECTED)
    target = pa.schema(
        [schema.field(name) for name in numeric] + [pa.field(length_column(s), pa.float64()) for s in sides]
    )
    parts = []
    for uri in uris:
        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            conform(parquet.schema_arrow.empty_table(), schema, uri)  # raises naming the gap
            for batch in parquet.iter_batches(batch_size=PLOT_BATCH_ROWS, columns=[*numeric, *sides]):
                arrays = [batch.column(name).cast(schema.field(name).type) for name in numeric]
                arrays += [_first_lengths(batch.column(side)) for side in sides]
                parts.append(pa.Table.from_arrays(arrays, schema=target))
    return pa.concat_tables(parts).combine_chunks() if parts else target.empty_table()


def _lengths(table: pa.Table, side: str) -> np.ndarray:
    if length_column(side) in table.column_names:
        return table.column(length_column(side)).to_numpy().astype(float)
    return np.array([len(conv[0][columns.CONTENT]) for conv in table.column(side).to_pylist()], dtype=float)


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
        for side, colour in ((columns.CHOSEN, CHOSEN_COLOUR), (columns.REJECTED, REJECTED_COLOUR)):
            values = [
                v for v in pairs.column(columns.signal_column(signal, side)).to_pylist() if v is not None
            ]
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
        chosen = (
            pairs.column(columns.signal_column(signal, columns.CHOSEN))
            .to_numpy(zero_copy_only=False)
            .astype(float)
        )
        rejected = (
            pairs.column(columns.signal_column(signal, columns.REJECTED))
            .to_numpy(zero_copy_only=False)
            .astype(float)
        )
        directions[signal] = np.sign(chosen - rejected)
    if (
        columns.JUDGE_P_CHOSEN in pairs.column_names
        and pairs.column(columns.JUDGE_P_CHOSEN).null_count < pairs.num_rows
    ):
        p = pairs.column(columns.JUDGE_P_CHOSEN).to_numpy(zero_copy_only=False).astype(float)
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
        values = (
            [v for v in table.column(columns.MARGIN).to_pylist() if v is not None] if table.num_rows else []
        )
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
        (columns.CHOSEN, CHOSEN_COLOUR, columns.SCORE_CHOSEN),
        (columns.REJECTED, REJECTED_COLOUR, columns.SCORE_REJECTED),
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
    """Every figure as PNG bytes keyed by file name, plus the numbers behind the agreement matrix.

    ``kept`` and ``dropped`` are whole pair tables or ``read_plot_table``'s slim ones.
    """
    candidates = kept
    if dropped.num_rows:
        extra = [name for name in dropped.column_names if name not in kept.column_names]
        candidates = pa.concat_tables([kept, dropped.drop_columns(extra)])
    images = {"funnel.png": funnel(funnel_steps, drops)}
    if candidates.num_rows:
        images["signals.png"] = signal_distributions(candidates, signals)
        images["agreement.png"], matrix = agreement_matrix(candidates, signals)
        images["margins.png"] = margins(kept, dropped)
        images["length_vs_score.png"] = length_vs_score(candidates)
    else:
        matrix = {}
    return images, {"agreement_matrix": matrix}
