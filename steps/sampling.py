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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyarrow as pa

from schemas import columns as c
from schemas.recipe import Recipe
from schemas.records import PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats, read_table, write_table
from steps.engines import Completion, Failed, Generator, SamplingParams, derive_seed, load_engine


def sampling_params(recipe: Recipe) -> SamplingParams:
    """The first (or only) temperature's parameters, with the recipe's full n."""
    s = recipe.sampling
    return SamplingParams(
        n=s.n, temperature=s.temperatures[0], top_p=s.top_p, max_tokens=s.max_tokens, too_long=s.too_long
    )


def sample_table(
    prompts: pa.Table,
    engine: Generator,
    params: SamplingParams,
    seed: int,
    temperatures: Sequence[float] | None = None,
) -> tuple[pa.Table, StageStats]:
    """``params.n`` responses per prompt; with several ``temperatures``, ``n / len`` at each.

    One temperature keeps the seeds of a plain run (derived from the prompt id alone), so adding
    the option changes nothing for recipes that do not use it. Several temperatures each get their
    own seeds (prompt id and group), and a prompt any group fails on is dropped whole: a prompt
    with answers from only some temperatures would skew its pair toward them.
    """
    stats = StageStats("sampling", rows_in=prompts.num_rows)
    ids = prompts.column(c.PROMPT_ID).to_pylist()
    conversations = prompts.column(c.MESSAGES).to_pylist()
    temps = list(temperatures) if temperatures else [params.temperature]
    if params.n % len(temps):
        raise ValueError(f"n={params.n} does not split evenly over temperatures {temps}")
    per_group = replace(params, n=params.n // len(temps))
    groups: list[list[list[Completion] | Failed]] = []
    for group, temperature in enumerate(temps):
        seeds = [derive_seed(seed, pid) if len(temps) == 1 else derive_seed(seed, pid, group) for pid in ids]
        groups.append(engine.generate(conversations, replace(per_group, temperature=temperature), seeds))
    rows: dict[str, list[Any]] = {name: [] for name in RESPONSES.names}
    for at, pid in enumerate(ids):
        results = [group[at] for group in groups]
        failed = next((r for r in results if isinstance(r, Failed)), None)
        if failed is not None:
            stats.drop(failed.reason, example=f"prompt {pid}: {failed.message}")
            continue
        result = [(completion, temps[g]) for g, group in enumerate(results) for completion in group]
        if result and result[0][0].prompt_turns_dropped:
            stats.counts["prompts_truncated"] += 1
        for index, (completion, temperature) in enumerate(result):
            text = completion.text
            rows[c.PROMPT_ID].append(pid)
            rows[c.RESPONSE_ID].append(f"{pid}-{index}")
            rows[c.SAMPLE_INDEX].append(index)
            rows[c.TEXT].append(text)
            rows[c.FINISH_REASON].append(completion.finish_reason)
            rows[c.TRUNCATED].append(completion.finish_reason == "length")
            rows[c.IS_EMPTY].append(not text.strip())
            rows[c.NUM_TOKENS].append(completion.num_tokens)
            rows[c.PROMPT_TOKENS].append(completion.prompt_tokens)
            rows[c.PROMPT_TURNS_DROPPED].append(completion.prompt_turns_dropped)
            rows[c.POLICY_MODEL].append(engine.model_id)
            rows[c.ENGINE].append(engine.engine_name)
            rows[c.TEMPERATURE].append(temperature)
            rows[c.TOP_P].append(params.top_p)
            rows[c.MAX_TOKENS].append(params.max_tokens)
            rows[c.SEED].append(completion.seed)
    table = pa.Table.from_pydict(rows, schema=RESPONSES)
    stats.rows_out = table.num_rows
    stats.counts["responses"] = table.num_rows
    stats.counts["truncated"] = sum(rows[c.TRUNCATED])
    stats.counts["empty"] = sum(rows[c.IS_EMPTY])
    stats.counts["tokens"] = sum(rows[c.NUM_TOKENS])
    return table, stats


def sample_shard(recipe: Recipe, prompts_uri: str, out_uri: str) -> ShardResult:
    """Sample one prompt shard; the engine is loaded once per process and reused."""
    start = time.perf_counter()
    prompts = read_table(prompts_uri, PROMPTS)
    engine = load_engine(recipe.policy)
    table, stats = sample_table(
        prompts, engine, sampling_params(recipe), recipe.sampling.seed, recipe.sampling.temperatures
    )
    write_table(table, out_uri, RESPONSES, what="responses")
    stats.seconds = time.perf_counter() - start
    return ShardResult(out_uri, table.num_rows, stats)
