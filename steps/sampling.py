"""On-policy sampling: n responses per prompt from the policy model.

Seeds are derived from (recipe seed, prompt id), never from a prompt's position,
so a prompt gets the same samples whichever shard or order it runs in. Empty and
truncated responses are kept and marked; a prompt the engine cannot take
(longer than the context) is dropped with a reason, or with
``sampling.too_long: truncate_left`` run without its oldest turns, which every
response records (``prompt_turns_dropped``) so labelers and pairs use the
conversation the policy actually saw.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import columns, reasons, stage_names
from schemas.recipe import Recipe
from schemas.records import PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats
from steps.engines import Completion, Failed, Generator, SamplingParams, derive_seed, load_engine
from steps.run.files import read_table, write_table


def sampling_params(recipe: Recipe) -> SamplingParams:
    """The first (or only) temperature's parameters, with the recipe's full n."""
    s = recipe.sampling
    return SamplingParams(
        n=s.n, temperature=s.temperatures[0], top_p=s.top_p, max_tokens=s.max_tokens, too_long=s.too_long
    )


# A prompt the engine could not take: its reason and message, kept with the shard so a later shard
# holding the same prompt (same settings) can report the same drop without asking the engine again.
Failures = dict[str, tuple[str, str]]
# Failures a slot's later shard takes over instead of sampling again: the same prompt, settings and
# model fail the same way. An engine's transient error is not one of them.
REPLAYED = frozenset({reasons.PROMPT_TOO_LONG})


def sample_table(
    prompts: pa.Table,
    engine: Generator,
    params: SamplingParams,
    seed: int,
    temperatures: Sequence[float] | None = None,
) -> tuple[pa.Table, StageStats]:
    table, stats, _ = sample_rows(prompts, engine, params, seed, temperatures)
    return table, stats


def sample_rows(
    prompts: pa.Table,
    engine: Generator,
    params: SamplingParams,
    seed: int,
    temperatures: Sequence[float] | None = None,
) -> tuple[pa.Table, StageStats, Failures]:
    """The responses of ``prompts``, the stage's stats and the prompts the engine failed (by id).

    ``params.n`` responses per prompt; with several ``temperatures``, ``n / len`` at each. One
    temperature keeps the seeds of a plain run (derived from the prompt id alone), so adding the
    option changes nothing for recipes that do not use it. Several temperatures each get their own
    seeds (prompt id and group), and a prompt any group fails on is dropped whole: a prompt with
    answers from only some temperatures would skew its pair toward them.
    """
    stats = StageStats(stage_names.SAMPLING, rows_in=prompts.num_rows)
    ids = prompts.column(columns.PROMPT_ID).to_pylist()
    conversations = prompts.column(columns.MESSAGES).to_pylist()
    temps = list(temperatures) if temperatures else [params.temperature]
    if params.n % len(temps):
        raise ValueError(f"n={params.n} does not split evenly over temperatures {temps}")
    per_group = replace(params, n=params.n // len(temps))
    groups: list[list[list[Completion] | Failed]] = []
    for group, temperature in enumerate(temps):
        seeds = [derive_seed(seed, pid) if len(temps) == 1 else derive_seed(seed, pid, group) for pid in ids]
        groups.append(engine.generate(conversations, replace(per_group, temperature=temperature), seeds))
    rows: dict[str, list[Any]] = {name: [] for name in RESPONSES.names}
    failed: Failures = {}
    for at, pid in enumerate(ids):
        results = [group[at] for group in groups]
        failure = next((r for r in results if isinstance(r, Failed)), None)
        if failure is not None:
            stats.drop(failure.reason, example=f"prompt {pid}: {failure.message}")
            if failure.reason in REPLAYED:  # anything else (an engine error) is tried again next time
                failed[pid] = (failure.reason, f"prompt {pid}: {failure.message}")
            continue
        result = [(completion, temps[g]) for g, group in enumerate(results) for completion in group]
        for index, (completion, temperature) in enumerate(result):
            text = completion.text
            rows[columns.PROMPT_ID].append(pid)
            rows[columns.RESPONSE_ID].append(f"{pid}-{index}")
            rows[columns.SAMPLE_INDEX].append(index)
            rows[columns.TEXT].append(text)
            rows[columns.FINISH_REASON].append(completion.finish_reason)
            rows[columns.TRUNCATED].append(completion.finish_reason == "length")
            rows[columns.IS_EMPTY].append(not text.strip())
            rows[columns.NUM_TOKENS].append(completion.num_tokens)
            rows[columns.PROMPT_TOKENS].append(completion.prompt_tokens)
            rows[columns.PROMPT_TURNS_DROPPED].append(completion.prompt_turns_dropped)
            rows[columns.POLICY_MODEL].append(engine.model_id)
            rows[columns.ENGINE].append(engine.engine_name)
            rows[columns.TEMPERATURE].append(temperature)
            rows[columns.TOP_P].append(params.top_p)
            rows[columns.MAX_TOKENS].append(params.max_tokens)
            rows[columns.SEED].append(completion.seed)
    table = pa.Table.from_pydict(rows, schema=RESPONSES)
    _count(table, stats)
    return table, stats, failed


def _count(table: pa.Table, stats: StageStats) -> None:
    """The stage's counts, from the responses table itself (so reused and new rows count alike)."""
    stats.rows_out = table.num_rows
    stats.counts["responses"] = table.num_rows
    stats.counts["truncated"] = pc.sum(table.column(columns.TRUNCATED)).as_py() or 0
    stats.counts["empty"] = pc.sum(table.column(columns.IS_EMPTY)).as_py() or 0
    stats.counts["tokens"] = pc.sum(table.column(columns.NUM_TOKENS)).as_py() or 0
    first = table.filter(pc.equal(table.column(columns.SAMPLE_INDEX), 0))
    truncated = pc.sum(pc.greater(first.column(columns.PROMPT_TURNS_DROPPED), 0)).as_py() or 0
    if truncated:
        stats.counts["prompts_truncated"] = truncated


@dataclass(frozen=True)
class Earlier:
    """A finished sampling shard with the same settings whose prompts may overlap this one's."""

    uri: str  # its responses
    failed: Failures


@dataclass(frozen=True)
class Sampled:
    result: ShardResult
    failed: Failures


def sample_shard(recipe: Recipe, prompts_uri: str, out_uri: str, earlier: Iterable[Earlier] = ()) -> Sampled:
    """Sample one prompt shard; the engine is loaded once per process and reused.

    A prompt that an ``earlier`` shard (same sampling settings) already sampled, or failed for a
    reason that would repeat (``REPLAYED``), is taken from it instead of asking the engine again:
    samples depend only on the settings and the prompt id, so they are the same rows. The engine
    loads only if some prompt is new.
    """
    start = time.perf_counter()
    prompts = read_table(prompts_uri, PROMPTS)
    ids = prompts.column(columns.PROMPT_ID).to_pylist()
    wanted = set(ids)
    reused: list[pa.Table] = []
    failed: Failures = {}
    for shard in earlier:
        if not wanted:
            break
        old = read_table(shard.uri, RESPONSES)
        old = old.filter(pc.is_in(old.column(columns.PROMPT_ID), pa.array(sorted(wanted), pa.string())))
        if old.num_rows:
            reused.append(old)
            wanted -= set(old.column(columns.PROMPT_ID).to_pylist())
        for pid in sorted(wanted & shard.failed.keys()):
            reason, message = shard.failed[pid]  # a JSON list in the marker
            failed[pid] = (str(reason), str(message))
            wanted.discard(pid)
    stats = StageStats(stage_names.SAMPLING, rows_in=prompts.num_rows)
    for reason, message in failed.values():  # an earlier shard's drops, reported again
        stats.drop(reason, example=message)
    tables = list(reused)
    todo = prompts.filter(pc.is_in(prompts.column(columns.PROMPT_ID), pa.array(sorted(wanted), pa.string())))
    if todo.num_rows:
        new, new_stats, new_failed = sample_rows(
            todo,
            load_engine(recipe.policy),
            sampling_params(recipe),
            recipe.sampling.seed,
            recipe.sampling.temperatures,
        )
        tables.append(new)
        for reason, count in new_stats.drops.items():
            stats.drop(reason, count, example=new_stats.examples.get(reason))
        failed.update(new_failed)
    table = pa.concat_tables(tables) if tables else RESPONSES.empty_table()
    order = {pid: i for i, pid in enumerate(ids)}
    position = [order[pid] for pid in table.column(columns.PROMPT_ID).to_pylist()]
    ranked = np.lexsort((table.column(columns.SAMPLE_INDEX).to_numpy(), np.asarray(position, dtype=np.int64)))
    table = table.take(pa.array(ranked, pa.int64()))
    _count(table, stats)
    reused_prompts = prompts.num_rows - todo.num_rows
    if reused_prompts:
        stats.counts["prompts_reused"] = reused_prompts
    write_table(table, out_uri, RESPONSES, what="responses")
    stats.seconds = time.perf_counter() - start
    return Sampled(ShardResult(out_uri, table.num_rows, stats), failed)
