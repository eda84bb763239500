"""Each stage of the data path as a resumable shard job: what its key is made of, and how it runs.

The steps themselves (``steps.sampling``, ``steps.labelers``, ``steps.pairing.pairs``,
``steps.pairing.consistency``) know nothing about resuming; this module says, per stage,
which settings shape its output (they go into the shard key, see
``steps.run.resume``) and hands the step the URIs to write. Labels are kept per
labeler, so adding or changing one signal recomputes that signal only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa

from schemas import columns, reasons, stage_names
from schemas.recipe import BleuConfig, PromptsConfig, Recipe
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats
from steps.engines import resolve_model, tokens_through_models
from steps.labelers.joint import Labelled, label_jointly
from steps.labelers.registry import build_labeler
from steps.pairing.aggregate import Aggregation, run_stats, wide_scores
from steps.pairing.consistency import consistency_stage, read_columns
from steps.pairing.pairs import pair_shard
from steps.prompts.decontaminate import Decontaminator
from steps.prompts.near_duplicates import NearDuplicates
from steps.prompts.normalise import stream_prompts
from steps.prompts.sources import PromptSourceError, source_label
from steps.publish.cost import JOINTLY, PASS_TOKENS, SCORED
from steps.run.files import join_uri, parquet_rows, read_table, write_bytes_atomic, write_table
from steps.run.resume import Done, WorkArea, shaping_settings
from steps.sampling import Earlier, sample_shard


def _dump(model: Any) -> Any:
    return shaping_settings(model.model_dump(mode="json"))


def _content_sha(table: pa.Table) -> str:
    content = json.dumps(table.to_pylist(), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(content.encode()).hexdigest()


@dataclass
class PromptFilters:
    """The run's prompt filters (``prompts.decontaminate``, ``prompts.near_duplicates``), in that order.

    Decontamination first: a contaminated prompt must not be the kept copy that makes a clean
    paraphrase of it a near-duplicate.
    """

    decontaminate: Decontaminator | None = None
    near_duplicates: NearDuplicates | None = None

    @classmethod
    def of(cls, config: PromptsConfig, area: WorkArea) -> PromptFilters:
        """Load the filters (eval set indexes are built once per set checksum, in ``area``)."""
        return cls(
            Decontaminator(config.decontaminate, area) if config.decontaminate else None,
            NearDuplicates(config.near_duplicates) if config.near_duplicates else None,
        )

    def apply(self, shard: pa.Table, stats: StageStats) -> pa.Table:
        for step in (self.decontaminate, self.near_duplicates):
            if step is not None and shard.num_rows:
                shard = step.apply(shard, stats)
        return shard

    def entries(self) -> list[str]:
        """The work entries the filters read (eval set indexes): a run's record keeps them from GC."""
        return [index.entry for index in self.decontaminate.indexes] if self.decontaminate else []

    def report(self, stats: StageStats) -> dict[str, Any]:
        """What ``stats.json`` (and so the manifest and the card) says about the filters that ran."""
        out: dict[str, Any] = {}
        if self.decontaminate is not None:
            out["decontamination"] = self.decontaminate.report()
            for name, facts in out["decontamination"]["sets"].items():
                facts["dropped"] = stats.drops.get(reasons.contaminated(name), 0)
        if self.near_duplicates is not None:
            out["near_duplicates"] = {
                **self.near_duplicates.report(),
                "dropped": stats.drops.get(reasons.NEAR_DUPLICATE, 0),
            }
        return out


def prompt_shards(
    recipe: Recipe,
    area: WorkArea,
    report: dict[str, Any] | None = None,
    entries: set[str] | None = None,
) -> tuple[list[ShardResult], StageStats]:
    """Read, filter and split the prompts (cheap, redone every run); a shard's key is its content.

    The source is streamed shard by shard, so only one shard of prompts is in memory at a time.
    Shards are cut before the prompt filters run (each shard is its slot's prompts less the
    dropped ones), so changing a filter setting changes only the shards whose drops changed, and
    sampling finds the surviving prompts' samples in their slot (``sample``). ``report`` gets the
    filters' own facts (eval set sizes and checksums, near-duplicate settings); ``entries`` the
    work entries the filters read, for the run's record.
    """
    stats = StageStats(stage_names.PROMPTS)
    filters = PromptFilters.of(recipe.prompts, area)
    shards = []
    for slot_table in stream_prompts(recipe.prompts, stats, recipe.output.prompts_per_shard, recipe.limit):
        slot = _content_sha(slot_table)
        shard = filters.apply(slot_table, stats)
        if not shard.num_rows:
            continue
        # Unfiltered, the shard is its slot: the key the prompts stage always had.
        content = slot if shard.num_rows == slot_table.num_rows else _content_sha(shard)
        key = area.key(stage_names.PROMPTS, {}, [content])

        def compute(files: dict[str, str], shard: pa.Table = shard) -> Any:
            write_table(shard, files["data"], PROMPTS, what="prompts")
            part = StageStats(stage_names.PROMPTS, rows_in=shard.num_rows, rows_out=shard.num_rows)
            return part, {"data": shard.num_rows}, {}

        result = area.run(stage_names.PROMPTS, key, compute).result()
        shards.append(replace(result, slot=slot, entries=(area.entry(stage_names.PROMPTS, key),)))
    if report is not None:
        report.update(filters.report(stats))
    if entries is not None:
        entries.update(filters.entries())
    if not shards:
        drops = ", ".join(f"{k} x{v}" for k, v in stats.drops.most_common())
        examples = "".join(f"\n  {k}: {v}" for k, v in sorted(stats.examples.items()))
        raise PromptSourceError(
            f"the prompt filters dropped every prompt of {source_label(recipe.prompts)} "
            f"({stats.rows_in} read; {drops}){examples}\nloosen prompts.decontaminate / "
            "prompts.near_duplicates (threshold) or check the eval sets"
        )
    return shards, stats


def sampling_settings(recipe: Recipe) -> dict[str, Any]:
    model = resolve_model(recipe.policy.model, recipe.policy.engine)
    return {"policy": _dump(recipe.policy), "model_id": model.model_id, "sampling": _dump(recipe.sampling)}


SLOT_MEMORY = 4  # earlier sampling shards remembered per slot (the latest first)


def _slot_uri(area: WorkArea, settings: dict[str, Any], slot: str) -> str:
    """Where a slot's finished sampling shards are listed: one small file per (settings, slot)."""
    key = area.key(stage_names.SAMPLING, settings, ["slot", slot])
    return join_uri(area.root, stage_names.SAMPLING, "slots", f"{key}.json")


def slot_entries(recipe: Recipe, area: WorkArea, prompts: list[ShardResult]) -> list[str]:
    """The slot lists the shards' sampling reads and writes, as run-record entries."""
    settings = sampling_settings(recipe)  # resolves the policy's model: once, not per shard
    return [area.entry_of(_slot_uri(area, settings, p.slot)) for p in prompts if p.slot]


def _slot_keys(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        with fs.open(path, "r", encoding="utf-8") as handle:
            keys = json.load(handle)
    except (OSError, ValueError):  # none yet, or a list cut short: only a lost chance to reuse
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def _earlier(area: WorkArea, uri: str, key: str) -> Iterator[Earlier]:
    """The slot's finished sampling shards (checked against their checksums), latest first.

    Lazily: each lookup checksums a whole file, and sampling usually finds every prompt it wants
    in the first.
    """
    for earlier_key in _slot_keys(uri):
        done = area.lookup(stage_names.SAMPLING, earlier_key) if earlier_key != key else None
        if done is not None:
            failed = done.extra.get("failed", {})
            yield Earlier(done.files["data"], failed if isinstance(failed, dict) else {})


def sample(recipe: Recipe, area: WorkArea, prompts: ShardResult) -> ShardResult:
    """One shard's samples: found finished, or computed, reusing any prompt its slot sampled before.

    The key is the sampling settings and the shard's content only (never a prompt filter's
    settings): a shard whose prompts are unchanged is found as it is; one that lost or gained a
    prompt takes each prompt sampled before from the slot's earlier shard and samples only the rest.
    """
    settings = sampling_settings(recipe)
    key = area.key(stage_names.SAMPLING, settings, [prompts.sha256])
    slot_uri = _slot_uri(area, settings, prompts.slot) if prompts.slot else None

    def compute(files: dict[str, str]) -> Any:
        earlier = _earlier(area, slot_uri, key) if slot_uri else iter(())
        done = sample_shard(recipe, prompts.uri, files["data"], earlier)
        failed = {pid: list(value) for pid, value in sorted(done.failed.items())}
        return done.result.stats, {"data": done.result.rows}, {"failed": failed}

    done = area.run(stage_names.SAMPLING, key, compute)
    if slot_uri is not None:
        keys = _slot_keys(slot_uri)
        if not keys or keys[0] != key:
            listed = [key, *(k for k in keys if k != key)][:SLOT_MEMORY]
            write_bytes_atomic(slot_uri, json.dumps(listed).encode())
    slot_entries = (area.entry_of(slot_uri),) if slot_uri is not None else ()
    return replace(done.result(), entries=(area.entry(stage_names.SAMPLING, key), *slot_entries))


def reads_a_model(config: Any) -> bool:
    """Whether a labeler loads a model (and so belongs on a model pool), as opposed to CPU-only BLEU."""
    return not isinstance(config, BleuConfig)


def _label_key(config: Any, area: WorkArea, prompts: ShardResult, responses: ShardResult) -> tuple[str, str]:
    """A labeler's own part: its settings and both inputs, whichever labelers it is scored with."""
    stage = f"label:{config.kind}"
    return stage, area.key(stage, _dump(config), [prompts.sha256, responses.sha256])


def label_parts(
    configs: list[Any], area: WorkArea, prompts: ShardResult, responses: ShardResult
) -> list[Done]:
    """Each labeler's part of one shard, in order; the unfinished ones are scored together.

    Every part keeps its own key and marker, so a changed labeler recomputes alone and an
    unchanged one is found finished; those computed now read their models in one pass per
    engine (``steps.labelers.joint``), where the text they share runs once. Each part is stored
    as soon as its pass ends, not when the shard's last one does: a run killed during a later
    pass finds the earlier passes' parts finished.
    """
    keys = [_label_key(config, area, prompts, responses) for config in configs]
    found = {i: done for i, (stage, key) in enumerate(keys) if (done := area.lookup(stage, key)) is not None}
    todo = [i for i in range(len(configs)) if i not in found]

    def keep(j: int, table: pa.Table, stats: StageStats) -> None:
        i = todo[j]
        found[i] = _store(area, *keys[i], table, stats, f"labels of {configs[i].name}")

    if todo:
        _label_now([configs[i] for i in todo], prompts, responses, keep)
    return [found[i] for i in range(len(configs))]  # label_jointly hands over every labeler or raises


def _store(area: WorkArea, stage: str, key: str, table: pa.Table, stats: StageStats, what: str) -> Done:
    """Write a table computed already as the part ``key``, marker last."""

    def write(files: dict[str, str]) -> Any:
        write_table(table, files["data"], LABELS, what=what)
        return stats, {"data": table.num_rows}, {}

    return area.run(stage, key, write)


def _label_now(
    configs: list[Any],
    prompts: ShardResult,
    responses: ShardResult,
    keep: Callable[[int, pa.Table, StageStats], None],
) -> None:
    """The tables and stats of ``configs`` for one shard, their model reads pooled per engine,
    each handed to ``keep`` (with its index in ``configs``) as soon as it exists.

    A labeler's seconds include loading its models (once per process: the first labeler reading a
    model pays) and an equal share of any pass it shared; its ``tokens_scored`` the same share of
    the pass's tokens, with ``scored_jointly`` counting the shards where that was so and
    ``joint_pass_tokens`` the whole passes (``steps.publish.cost`` reports both).
    """
    labelers, loading = [], []
    for config in configs:
        start = time.perf_counter()
        labelers.append(build_labeler(config))
        loading.append(time.perf_counter() - start)  # a model loads once per process, for its first reader

    def finished(i: int, done: Labelled) -> None:
        stats = done.stats
        if reads_a_model(configs[i]):
            stats.counts[SCORED] = done.tokens
        if done.shared_by > 1:
            stats.counts[JOINTLY] = 1
            stats.counts[PASS_TOKENS] = done.pass_tokens
        stats.seconds = loading[i] + done.seconds
        keep(i, done.table, stats)

    label_jointly(
        labelers, read_table(prompts.uri, PROMPTS), read_table(responses.uri, RESPONSES), on_done=finished
    )


def label_entries(recipe: Recipe, area: WorkArea, prompts: ShardResult, responses: ShardResult) -> list[str]:
    """The per-labeler parts one shard's merged labels were made from (for the run record, GC)."""
    return [area.entry(*_label_key(config, area, prompts, responses)) for config in recipe.labelers]


def label_models(recipe: Recipe, area: WorkArea, prompts: ShardResult, responses: ShardResult) -> int:
    """Only the model-reading labelers' parts of one shard (what a model pool runs).

    Their markers are what ``label`` later finds, so the merge elsewhere reuses them untouched.
    Returns how many parts were computed now (the rest were found finished).
    """
    models = [config for config in recipe.labelers if reads_a_model(config)]
    parts = label_parts(models, area, prompts, responses)
    return sum(not part.resumed for part in parts)


def label(
    recipe: Recipe,
    area: WorkArea,
    prompts: ShardResult,
    responses: ShardResult,
    model_area: WorkArea | None = None,
) -> ShardResult:
    """Every labeler's scores for one shard, each labeler its own resumable part, merged into one table.

    ``model_area`` (default ``area``) is where the model-reading parts are looked up: a run whose
    model pool just recomputed them (``--fresh``) must find them, not recompute them here.
    """
    done: dict[str, Done] = {}
    for where, model_reading in ((model_area or area, True), (area, False)):
        configs = [config for config in recipe.labelers if reads_a_model(config) == model_reading]
        found = label_parts(configs, where, prompts, responses)
        done.update(zip([config.name for config in configs], found, strict=True))
    parts = [(config.name, done[config.name]) for config in recipe.labelers]

    total = StageStats(stage_names.LABELING, rows_in=responses.rows)
    for name, part in parts:
        total.drops.update({f"{name}:{k}": v for k, v in part.stats.drops.items()})
        total.examples.update({f"{name}:{k}": v for k, v in part.stats.examples.items()})
        total.counts[f"{name}:scored"] += part.stats.rows_out
        total.counts.update({f"{name}:{k}": v for k, v in part.stats.counts.items() if k != "scored"})
        total.seconds += part.stats.seconds
        total.timings[name] = part.stats.seconds
    key = area.key("labels", [name for name, _ in parts], [part.checksums["data"] for _, part in parts])

    def merge(files: dict[str, str]) -> Any:
        tables = [read_table(part.files["data"], LABELS) for _, part in parts]
        merged = pa.concat_tables(tables) if tables else LABELS.empty_table()
        write_table(merged, files["data"], LABELS, what="labels")
        total.rows_out = merged.num_rows
        return total, {"data": merged.num_rows}, {}

    part_entries = tuple(label_entries(recipe, area, prompts, responses))
    return replace(
        area.run("labels", key, merge).result(), entries=(*part_entries, area.entry("labels", key))
    )


def pairing_settings(recipe: Recipe) -> dict[str, Any]:
    return {
        "pairing": _dump(recipe.pairing),
        "weights": {labeler.name: labeler.weight for labeler in recipe.labelers},
        "seed": recipe.sampling.seed,
        "rank_signals": recipe.consistency.rank_signals,
    }


def aggregation_stats(
    recipe: Recipe, responses: list[ShardResult], labels: list[ShardResult]
) -> dict[str, Any] | None:
    """The run-wide numbers pairing needs (``steps.pairing.aggregate.run_stats``), or None when it needs none.

    Reads only the score columns of every label shard and, for length control, the text of
    every response, so it costs seconds even for large runs; it is recomputed each run
    and goes into every pairing key, so a run whose labels changed re-pairs every shard.
    """
    aggregation = Aggregation.of(recipe)
    if not aggregation.needs_run_stats:
        return None
    label_parts = [
        read_columns(s.uri, [columns.PROMPT_ID, columns.RESPONSE_ID, columns.SIGNAL, columns.SCORE], LABELS)
        for s in labels
    ]
    # Texts only for length control: a spread scale alone needs the scores and nothing else.
    text_parts = [
        read_columns(s.uri, [columns.RESPONSE_ID, columns.TEXT], RESPONSES)
        for s in responses
        if aggregation.residual
    ]
    lengths = pl.from_arrow(pa.concat_tables(text_parts)) if text_parts else None
    assert lengths is None or isinstance(lengths, pl.DataFrame)
    all_labels = pa.concat_tables(label_parts) if label_parts else LABELS.empty_table()
    wide = wide_scores(all_labels, aggregation.signals, lengths)
    return run_stats(wide, aggregation).to_dict()


def pair(
    recipe: Recipe,
    area: WorkArea,
    prompts: ShardResult,
    responses: ShardResult,
    labels: ShardResult,
    stats_of_run: dict[str, Any] | None = None,
) -> ShardResult:
    settings = pairing_settings(recipe)
    if stats_of_run is not None:  # absent, not null, so runs without run stats keep their keys
        settings["run_stats"] = stats_of_run
    key = area.key(stage_names.PAIRING, settings, [prompts.sha256, responses.sha256, labels.sha256])

    def compute(files: dict[str, str]) -> Any:
        tokens = tokens_through_models()
        result = pair_shard(recipe, prompts.uri, responses.uri, labels.uri, files["data"], stats_of_run)
        if recipe.pairing.judge is not None:  # the pair judge reads a model
            result.stats.counts[SCORED] = tokens_through_models() - tokens
        return result.stats, {"data": result.rows}, {}

    return replace(
        area.run(stage_names.PAIRING, key, compute).result(), entries=(area.entry(stage_names.PAIRING, key),)
    )


def filter_pairs(
    recipe: Recipe, area: WorkArea, pairs: list[ShardResult]
) -> tuple[ShardResult, ShardResult, dict[str, Any]]:
    """The consistency rules over all candidate pairs: kept and dropped shards plus the length report."""
    settings = {"consistency": _dump(recipe.consistency), "signals": recipe.signals}
    key = area.key(stage_names.CONSISTENCY, settings, [p.sha256 for p in pairs])

    def compute(files: dict[str, str]) -> Any:
        stats, report = consistency_stage(recipe, [p.uri for p in pairs], files["kept"], files["dropped"])
        rows = {role: parquet_rows(uri) for role, uri in files.items()}
        return stats, rows, {"length": report}

    done = area.run(stage_names.CONSISTENCY, key, compute, roles=("kept", "dropped"))
    entries = (area.entry(stage_names.CONSISTENCY, key),)  # kept and dropped: one entry, two roles
    kept, dropped = (replace(done.result(role), entries=entries) for role in ("kept", "dropped"))
    return kept, dropped, done.extra["length"]
