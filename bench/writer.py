"""Writer: our publication of a split (``steps.publish.writer.write_split``) against a raw
``pyarrow.dataset.write_dataset`` of the same pairs shards.

Both read the same Parquet shards (what the consistency stage leaves behind) and write
zstd Parquet files of the same size limit; ours also checks each chunk against the
contract and checksums it for the manifest. Both outputs are read back and must hold
exactly the input rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.common import DEFAULT_OUT, Row, finish, interleave, log, median_ratio, parser, total_seconds
from bench.data import pairs_table
from schemas import columns
from schemas.recipe import OutputConfig, Recipe
from schemas.records import pairs_schema
from steps.publish.writer import write_split
from steps.run.files import write_table

NAME = "writer"


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by(columns.PROMPT_ID).combine_chunks()


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    total = args.rows or (2_000 if args.quick else 100_000)
    shard_rows = 500 if args.quick else 4_000
    rows_per_shard = 1_000 if args.quick else 10_000
    rounds = 1 if args.quick else 5
    recipe = Recipe(name="bench-writer", output=OutputConfig(rows_per_shard=rows_per_shard))
    schema = pairs_schema(recipe.signals)
    source = pairs_table(total, recipe.signals)
    # The writer stamps the recipe hash at publication; give the source the same stamp to compare.
    stamp = pa.array([recipe.fingerprint()] * source.num_rows, pa.string())
    source = source.set_column(source.schema.get_field_index(columns.RECIPE_HASH), columns.RECIPE_HASH, stamp)
    scratch = Path(tempfile.mkdtemp(prefix="writer-", dir=_scratch_root(args)))
    try:
        inputs = [
            write_table(
                source.slice(start, shard_rows), str(scratch / "in" / f"shard-{i:05d}.parquet"), schema
            )
            for i, start in enumerate(range(0, total, shard_rows))
        ]
        in_bytes = sum(Path(u).stat().st_size for u in inputs)
        log(f"writer: {total} pairs in {len(inputs)} input shards ({in_bytes / 2**20:.0f} MiB of parquet)")
        ours_dir, raw_dir = scratch / "ours", scratch / "raw"

        def ours() -> list[Any]:
            shutil.rmtree(ours_dir, ignore_errors=True)
            files, _ = write_split(str(ours_dir), "train", inputs, recipe, schema)
            return files

        def raw() -> None:
            shutil.rmtree(raw_dir, ignore_errors=True)
            options = ds.ParquetFileFormat().make_write_options(compression="zstd")
            ds.write_dataset(
                ds.dataset(inputs, format="parquet", schema=schema),
                raw_dir,
                format="parquet",
                file_options=options,
                max_rows_per_file=rows_per_shard,
                max_rows_per_group=rows_per_shard,
                basename_template="train-{i}.parquet",
            )

        runs = interleave({"ours": ours, "raw": raw}, rounds)
        files = runs["ours"][-1].value
        ours_table = pa.concat_tables([pq.read_table(ours_dir / f.path) for f in files])
        raw_table = ds.dataset(raw_dir, format="parquet").to_table()
        expected = _sorted(source.cast(schema))
        same_rows = {
            "ours": ours_table.num_rows == total and _sorted(ours_table.cast(schema)).equals(expected),
            "raw": raw_table.num_rows == total and _sorted(raw_table.cast(schema)).equals(expected),
        }
        sizes = {
            "ours": sum(p.stat().st_size for p in ours_dir.rglob("*.parquet")),
            "raw": sum(p.stat().st_size for p in raw_dir.rglob("*.parquet")),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ours_s, raw_s = total_seconds(runs["ours"]), total_seconds(runs["raw"])
    n = total * rounds
    rows = [
        Row(
            NAME,
            "rows/s, write_split vs pyarrow.dataset.write_dataset (zstd)",
            f"{total:,} pairs, {len(inputs)} shards in, {rows_per_shard:,} rows/file",
            n / ours_s,
            n / raw_s,
            "rows/s",
            median_ratio(runs["ours"], runs["raw"]),
            target=0.8,
            note=f"same rows: {same_rows['ours'] and same_rows['raw']}; median of {rounds} rounds",
        )
    ]
    details = {
        "rows": total,
        "input_shards": len(inputs),
        "rows_per_file": rows_per_shard,
        "rounds": rounds,
        "seconds": {"ours": [r.seconds for r in runs["ours"]], "raw": [r.seconds for r in runs["raw"]]},
        "same_rows": same_rows,
        "output_files": len(files),
        "bytes": sizes,
        "pyarrow_version": pa.__version__,
    }
    return finish(NAME, args, rows, details, started)


def _scratch_root(args: argparse.Namespace) -> Path:
    """Scratch space next to the results, on the same disk the pipeline writes to."""
    root = Path(args.out if args.out else DEFAULT_OUT) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--rows", type=int, help="pairs to write (default 100k; --quick 2k)")
    payload = run(p.parse_args(argv))
    return 0 if all(payload["details"]["same_rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
