"""Decontamination: drop prompts that overlap evaluation sets by word n-grams (``prompts.decontaminate``).

An eval set is read once per checksum into an index of its word n-grams (hash, item, position),
stored in the work location as a resumable part like any other stage, so later runs only load
it. Prompts are then checked shard by shard against the loaded index: memory is the index plus
one shard, whatever the size of the prompt pool.

A prompt is contaminated by an eval item when the item's words covered by n-grams that also
occur in the prompt reach ``threshold`` of the item's words (Tülu 3's measure, on the eval
side, so a benchmark question pasted inside a longer prompt is still found). Both sides go
through the prompt-id normalisation (NFC, trimmed) plus lower-casing and splitting into ``\\w+``
words; only user turns count (a shared system prompt is not the benchmark).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas import columns, reasons
from schemas.recipe import DecontaminationConfig, EvalPromptSet, FilePrompts, HFPrompts
from steps.base import StageStats
from steps.prompts.normalise import InvalidRow, check_prompts, normalise_messages
from steps.prompts.sources import PromptSourceError, SourceKeys, load_hf_split, naming, raw_rows
from steps.run.files import read_table, write_table
from steps.run.resume import WorkArea, sha256_of

STAGE = "decontamination"
TIMING = "decontaminate"  # the prompt stage's timings key: seconds this filter added
# polars' hash is stable within one polars version only: the version is part of the index key.
HASH_SEED = 2_026_112_6
NGRAM_MIX = np.uint64(0x100000001B3)  # combines word hashes into an n-gram hash (wraps mod 2**64)
INDEX_BATCH_ROWS = 4096  # eval rows turned into n-grams at once while building an index
EXAMPLE_CHARS = 160
WORDS = r"\w+"

GRAMS = pa.schema([("gram", pa.uint64()), ("item", pa.int64()), ("pos", pa.int32())])
ITEMS = pa.schema(
    [("item", pa.int64()), ("words", pa.int32()), ("whole", pa.uint64()), ("text", pa.string())]
)


def match_text(messages: list[dict[str, str]]) -> str:
    """The text checked for overlap: the user turns (a system prompt or earlier answer is not a test item)."""
    return "\n".join(m[columns.CONTENT] for m in messages if m[columns.ROLE] == "user")


def clip(text: str, limit: int = EXAMPLE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


@dataclass(frozen=True)
class Grams:
    """The word n-grams of a batch of texts: which text, where in it, and the hash; plus per-text facts."""

    doc: np.ndarray
    pos: np.ndarray
    gram: np.ndarray
    words: np.ndarray  # words per text
    whole: np.ndarray  # hash of each text's whole word sequence (exact match of short texts)


def word_grams(texts: list[str], n: int) -> Grams:
    """Hashes of every n consecutive words of each text, vectorised over the batch (no loop per word)."""
    words = pl.Series(texts, dtype=pl.String).str.to_lowercase().str.extract_all(WORDS)
    lengths = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    whole = words.list.join(" ").hash(seed=HASH_SEED).to_numpy()
    flat = words.explode().drop_nulls()  # an empty list explodes to one null
    hashes = flat.hash(seed=HASH_SEED).to_numpy()
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    count = len(hashes) - n + 1
    if count <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return Grams(empty, empty.astype(np.int32), empty.astype(np.uint64), lengths, whole)
    gram = hashes[:count].copy()
    for k in range(1, n):
        gram = gram * NGRAM_MIX + hashes[k : k + count]
    first, last = doc[:count], doc[n - 1 : n - 1 + count]
    inside = first == last  # an n-gram that crosses from one text into the next is no n-gram
    pos = (np.arange(count, dtype=np.int64) - starts[first]).astype(np.int32)
    return Grams(first[inside], pos[inside], gram[inside], lengths, whole)


def _source(spec: EvalPromptSet) -> FilePrompts | HFPrompts:
    if spec.uri is not None:
        return FilePrompts(
            source="file",
            uri=spec.uri,
            format=spec.format,
            prompt_column=spec.prompt_column,
            references_column=None,
        )
    assert spec.hf is not None
    return HFPrompts(
        source="hf", path=spec.hf, config=spec.config, split=spec.split, prompt_column=spec.prompt_column
    )


def check_sets(config: DecontaminationConfig) -> None:
    """Every eval set readable and holding a usable prompt, found before any model loads.

    Reads each set only up to its first usable row (``check_prompts``) and writes nothing: the
    index itself is built by the prompt stage, under the run's lease on the work location.
    """
    for i, spec in enumerate(config.sets):
        with _reading(i, spec):
            check_prompts(_source(spec))


@contextmanager
def _reading(i: int, spec: EvalPromptSet) -> Iterator[None]:
    """Source errors while set ``i`` is read name it and its own keys (the prompt reader's say prompts.*)."""
    key = f"prompts.decontaminate.sets[{i}]"
    keys = SourceKeys(f"{key}.columns.prompt", f"{key}.columns", f"{key}.format", "eval set file")
    try:
        with naming(keys):
            yield
    except PromptSourceError as exc:
        raise PromptSourceError(f"{key} ({spec.name}): {exc}") from None


def set_checksum(spec: EvalPromptSet) -> str:
    """What identifies the set's content: the file's sha256, or the ``datasets`` fingerprint of the split."""
    if spec.uri is not None:
        digest = sha256_of(spec.uri)
        if digest is None:
            raise PromptSourceError(f"eval set file {spec.uri!r} does not exist or cannot be read")
        return digest
    assert spec.hf is not None
    return f"datasets:{load_hf_split(spec.hf, spec.config, spec.split)._fingerprint}"


@dataclass(frozen=True)
class EvalIndex:
    """One eval set's n-grams, loaded from the work location."""

    name: str
    grams: pl.DataFrame  # gram, item, pos
    items: pl.DataFrame  # item, words, whole, text
    stats: StageStats  # rows read, items indexed, unusable rows by reason
    checksum: str
    resumed: bool
    entry: str  # its work entry, which the run's record keeps from GC

    def text(self, item: int) -> str:
        return str(self.items.filter(pl.col("item") == item)["text"][0])

    def matches(self, q: Grams, docs: np.ndarray, n: int, threshold: float) -> dict[int, tuple[int, float]]:
        """For each text among ``docs`` that is contaminated: its index → (eval item, share covered).

        ``q`` is the word n-grams of a whole shard, made once for every set (they share ``n``);
        ``docs`` are the texts still in play (not dropped by an earlier set).
        """
        found = []
        if len(q.gram) and self.grams.height:
            hits = (
                pl.DataFrame({"doc": q.doc, "gram": q.gram})
                .filter(pl.col("doc").is_in(docs))
                .unique()
                .join(self.grams, on="gram")
                .select("doc", "item", "pos")
                .unique()
                .sort("doc", "item", "pos")
            )
            if hits.height:
                # Words covered by the matched n-grams: each covers n words, less its overlap with the next.
                gap = (pl.col("pos").shift(-1).over("doc", "item") - pl.col("pos")).fill_null(n).clip(0, n)
                covered = hits.with_columns(gap=gap).group_by("doc", "item").agg(pl.col("gap").sum())
                found.append(
                    covered.join(self.items.select("item", "words"), on="item").select(
                        "doc",
                        "item",
                        coverage=pl.min_horizontal(pl.col("gap"), pl.col("words")) / pl.col("words"),
                    )
                )
        exact = (
            pl.DataFrame({"doc": np.arange(len(q.words), dtype=np.int64), "whole": q.whole, "words": q.words})
            .filter((pl.col("words") > 0) & pl.col("doc").is_in(docs))
            .join(self.items.select("item", "whole"), on="whole")
            .select("doc", "item", coverage=pl.lit(1.0))
        )
        found.append(exact)
        best = (
            pl.concat(found)
            .filter(pl.col("coverage") >= threshold)
            .sort(["doc", "coverage", "item"], descending=[False, True, False])
            .unique(subset="doc", keep="first", maintain_order=True)
        )
        return {
            int(d): (int(i), float(cov))
            for d, i, cov in zip(best["doc"], best["item"], best["coverage"], strict=True)
        }


def build_index(spec: EvalPromptSet, n: int, area: WorkArea, i: int) -> EvalIndex:
    """Set ``i``'s index, built now if no finished one for this content and ``n`` is in the work location."""
    with _reading(i, spec):
        return _build_index(spec, n, area, f"prompts.decontaminate.sets[{i}]")


def _build_index(spec: EvalPromptSet, n: int, area: WorkArea, key_path: str) -> EvalIndex:
    checksum = set_checksum(spec)
    settings = {"ngram": n, "prompt_column": spec.prompt_column, "hash": f"polars-{pl.__version__}"}
    key = area.key(STAGE, settings, [checksum])

    def compute(files: dict[str, str]) -> Any:
        stats = StageStats(STAGE)
        grams: list[pa.Table] = []
        items: list[pa.Table] = []
        batch: list[tuple[int, str]] = []

        def flush() -> None:
            rows, texts = [i for i, _ in batch], [t for _, t in batch]
            q = word_grams(texts, n)
            row = np.asarray(rows, dtype=np.int64)
            grams.append(pa.table({"gram": q.gram, "item": row[q.doc], "pos": q.pos}, schema=GRAMS))
            usable = q.words > 0
            if not usable.all():
                first = rows[int(np.argmin(usable))]
                stats.drop(reasons.NO_WORDS, count=int((~usable).sum()), example=f"row {first}")
            kept = np.flatnonzero(usable)
            items.append(
                pa.table(
                    {
                        "item": row[kept],
                        "words": q.words[kept].astype(np.int32),
                        "whole": q.whole[kept],
                        "text": [texts[i] for i in kept],
                    },
                    schema=ITEMS,
                )
            )
            stats.rows_out += len(kept)
            stats.counts["short_items"] += int(((q.words > 0) & (q.words < n)).sum())
            batch.clear()

        for raw in raw_rows(_source(spec)):
            stats.rows_in += 1
            try:
                batch.append((raw.index, match_text(normalise_messages(raw.prompt))))
            except InvalidRow as exc:
                stats.drop(exc.reason, example=f"row {raw.index}: {exc}")
                continue
            if len(batch) == INDEX_BATCH_ROWS:
                flush()
        if batch:
            flush()
        if not stats.rows_out:
            raise PromptSourceError(
                f"no usable prompt in eval set {spec.name!r} ({stats.rows_in} rows read, "
                f"unusable {dict(stats.drops)}); check {key_path}.columns.prompt"
            )
        table = pa.concat_tables(grams).sort_by("gram") if grams else GRAMS.empty_table()
        stats.counts["ngrams"] = table.num_rows
        write_table(table, files["grams"], GRAMS, what=f"n-grams of eval set {spec.name}")
        write_table(pa.concat_tables(items), files["items"], ITEMS, what=f"items of eval set {spec.name}")
        return stats, {"grams": table.num_rows, "items": stats.rows_out}, {}

    done = area.run(STAGE, key, compute, roles=("grams", "items"))
    return EvalIndex(
        name=spec.name,
        grams=pl.from_arrow(read_table(done.files["grams"], GRAMS)),  # type: ignore[arg-type]
        items=pl.from_arrow(read_table(done.files["items"], ITEMS)),  # type: ignore[arg-type]
        stats=done.stats,
        checksum=checksum,
        resumed=done.resumed,
        entry=area.entry(STAGE, key),
    )


class Decontaminator:
    """The ``prompts.decontaminate`` filter over prompt shards, every eval set's index loaded once."""

    def __init__(self, config: DecontaminationConfig, area: WorkArea) -> None:
        self.config = config
        self.indexes = [build_index(spec, config.ngram, area, i) for i, spec in enumerate(config.sets)]

    def apply(self, shard: pa.Table, stats: StageStats) -> pa.Table:
        """The shard without its contaminated prompts; each drop counted under ``contaminated:<set>``."""
        start = time.perf_counter()
        texts = [match_text(m) for m in shard.column(columns.MESSAGES).to_pylist()]
        rows = shard.column(columns.SOURCE_ROW).to_pylist()
        keep = np.ones(shard.num_rows, dtype=bool)
        q = word_grams(texts, self.config.ngram)
        for index in self.indexes:
            found = index.matches(q, np.flatnonzero(keep), self.config.ngram, self.config.threshold)
            for row, (item, coverage) in sorted(found.items()):
                keep[row] = False
                reason = reasons.contaminated(index.name)
                example = None
                if reason not in stats.examples:
                    example = (
                        f"row {rows[row]}: {clip(texts[row])!r} covers {coverage:.0%} of eval set "
                        f"{index.name} row {item}: {clip(index.text(item))!r}"
                    )
                stats.drop(reason, example=example)
                stats.rows_out -= 1
        stats.timings[TIMING] = stats.timings.get(TIMING, 0.0) + time.perf_counter() - start
        return shard.filter(pa.array(keep))

    def report(self) -> dict[str, Any]:
        """What the card and ``stats.json`` say about the sets: sizes, checksums, unusable rows."""
        return {
            "ngram": self.config.ngram,
            "threshold": self.config.threshold,
            "sets": {
                index.name: {
                    "checksum": index.checksum,
                    "rows": index.stats.rows_in,
                    "items": index.stats.rows_out,
                    "ngrams": index.stats.counts.get("ngrams", 0),
                    "short_items": index.stats.counts.get("short_items", 0),
                    "unusable": dict(index.stats.drops),
                    "index_reused": index.resumed,
                }
                for index in self.indexes
            },
        }
