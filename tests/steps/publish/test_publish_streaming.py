"""Publication reads numbers, not texts: the figures, score summary and split files it makes that way
are the same as from whole pair tables, whichever way the pair files are cut into row groups."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import columns
from schemas.records import dropped_schema, pairs_schema
from steps.pairing.consistency import apply_rules, consistency_stage
from steps.publish import plots
from steps.publish.writer import score_summary, write_split
from steps.run.files import read_table, write_table
from tests.steps.pairing.test_consistency import random_pairs, split_into_shards


def cut(table: pa.Table, sizes: list[int], folder: Path, name: str, schema: pa.Schema) -> list[str]:
    uris, start = [], 0
    for i, size in enumerate(sizes):
        uris.append(write_table(table.slice(start, size), str(folder / f"{name}-{i}.parquet"), schema))
        start += size
    assert start == table.num_rows
    return uris


@pytest.fixture
def judged_pairs() -> tuple[pa.Table, object]:
    pairs, config = random_pairs(11, 30)
    judge = pa.array([None if i % 5 == 0 else (i % 7) / 7 for i in range(pairs.num_rows)], pa.float64())
    pairs = pairs.set_column(
        pairs.schema.get_field_index(columns.JUDGE_P_CHOSEN), columns.JUDGE_P_CHOSEN, judge
    )
    return pairs, config


def test_figures_from_slim_batched_reads_equal_figures_from_whole_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, judged_pairs: tuple[pa.Table, object]
) -> None:
    pairs, config = judged_pairs
    rules = config.consistency.model_copy(update={"ambiguous_quantile": 0.4})  # type: ignore[attr-defined]
    kept, dropped, _, _ = apply_rules(pairs, rules, config.signals)  # type: ignore[attr-defined]
    schema, dschema = pairs_schema(config.signals), dropped_schema(config.signals)  # type: ignore[attr-defined]
    kept, dropped = kept.cast(schema), dropped.cast(dschema)
    assert kept.num_rows and dropped.num_rows
    steps, drops = [("prompts read", 30), ("kept pairs", kept.num_rows)], {"pairs: ambiguous": 3}
    want_images, want_figures = plots.render_all(kept, dropped, config.signals, steps, drops)  # type: ignore[attr-defined]

    monkeypatch.setattr(plots, "PLOT_BATCH_ROWS", 4)  # several batches per file
    kept_uris = cut(kept, [5, kept.num_rows - 5], tmp_path, "kept", schema)
    dropped_uris = cut(dropped, [dropped.num_rows], tmp_path, "dropped", dschema)
    slim_kept = plots.read_plot_table(kept_uris, schema, config.signals)  # type: ignore[attr-defined]
    slim_dropped = plots.read_plot_table(dropped_uris, dschema, config.signals)  # type: ignore[attr-defined]
    assert (
        columns.CHOSEN not in slim_kept.column_names and columns.PROMPT not in slim_kept.column_names
    )  # no texts
    assert slim_kept.column(plots.length_column(columns.CHOSEN)).to_pylist() == [
        float(len(conv[0][columns.CONTENT])) for conv in kept.column(columns.CHOSEN).to_pylist()
    ]
    images, figures = plots.render_all(slim_kept, slim_dropped, config.signals, steps, drops)  # type: ignore[attr-defined]
    assert (
        set(images)
        == set(want_images)
        == {"funnel.png", "signals.png", "agreement.png", "margins.png", "length_vs_score.png"}
    )
    for name, data in want_images.items():
        assert images[name] == data, name
    assert figures == want_figures and "pair_judge" in figures["agreement_matrix"]


def test_score_summary_reads_columns_and_equals_the_whole_table_numbers(
    tmp_path: Path, judged_pairs: tuple[pa.Table, object]
) -> None:
    pairs, config = judged_pairs
    schema = pairs_schema(config.signals)  # type: ignore[attr-defined]
    uris = cut(pairs, [1, 12, pairs.num_rows - 13], tmp_path, "pairs", schema)
    got = score_summary(uris, config)  # type: ignore[arg-type]
    # The numbers a whole single-chunk table gives (what one single-group kept file gave before).
    frame = pl.from_arrow(pairs.combine_chunks())
    assert isinstance(frame, pl.DataFrame)
    expected = [columns.SCORE_CHOSEN, columns.SCORE_REJECTED, columns.MARGIN] + [
        columns.signal_column(s, side)
        for s in config.signals
        for side in (columns.CHOSEN, columns.REJECTED)  # type: ignore[attr-defined]
    ]
    assert set(got) == set(expected)
    for name in expected:
        col = frame.get_column(name).drop_nulls()
        assert got[name] == {
            "count": col.len(),
            "mean": col.mean(),
            "std": col.std(),
            "min": col.min(),
            "median": col.median(),
            "max": col.max(),
        }
    assert score_summary([], config) == {}  # type: ignore[arg-type]


def test_split_files_from_one_many_group_kept_file_equal_those_from_shards(tmp_path: Path) -> None:
    pairs, config = random_pairs(5, 30)
    config = config.model_copy(update={"output": config.output.model_copy(update={"rows_per_shard": 7})})
    uris = split_into_shards(pairs, [4, 9, 17], tmp_path, config.signals)
    kept_uri, dropped_uri = str(tmp_path / "kept.parquet"), str(tmp_path / "dropped.parquet")
    stats, _ = consistency_stage(config, uris, kept_uri, dropped_uri)
    assert pq.ParquetFile(kept_uri).num_row_groups == 3 and stats.rows_out > 7
    # The same kept rows as one single-group file per input shard, the way they were before.
    kept = read_table(kept_uri, pairs_schema(config.signals))
    single = write_table(kept, str(tmp_path / "single.parquet"), pairs_schema(config.signals))
    grouped, sample = write_split(str(tmp_path / "a"), "train", [kept_uri], config)
    plain, plain_sample = write_split(str(tmp_path / "b"), "train", [single], config)
    assert [(f.path, f.rows, f.sha256) for f in grouped] == [(f.path, f.rows, f.sha256) for f in plain]
    assert len(grouped) > 1 and sample.equals(plain_sample)
