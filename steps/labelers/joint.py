"""Several labelers over one shard, every request for one engine sent to it in a single call.

Labelers reading the same model ask it about the same texts: the density ratio's plain side
(prompt + response) is the prefix of every follow-up after that response, and judge prompts
share the rubric and the quoted conversation. An engine that merges a call's requests on shared
prefixes (the transformers trie) runs such text once only when every labeler's requests are in
that call. Labelers that cannot say their reads in advance (BLEU, generated judgements, reward
models) run alone, as they would on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from steps.base import StageStats
from steps.engines import tokens_through_models
from steps.labelers.base import Labeler, Plan, Shard, read_plans


@dataclass(frozen=True)
class Labelled:
    """One labeler's table and stats, and what scoring it cost.

    ``shared_by`` > 1: the labeler was read in one pass with that many labelers (itself
    included), and ``seconds`` and ``tokens`` hold its own planning and scoring time plus an
    equal share of that pass. A shared prefix runs once for all of them, so no split of the
    pass by labeler is measured; ``pass_seconds`` and ``pass_tokens`` are the whole pass.
    """

    table: pa.Table
    stats: StageStats
    seconds: float
    tokens: int
    shared_by: int = 1
    pass_seconds: float = 0.0
    pass_tokens: int = 0


def passes(plans: dict[int, Plan]) -> list[list[int]]:
    """Labelers whose plans read a common engine, transitively: each such set is read in one pass."""
    components: list[tuple[set[int], list[int]]] = []  # (engine ids, labelers)
    for i, plan in plans.items():
        engines = {id(engine) for engine, _ in plan.reads}
        touching = [comp for comp in components if comp[0] & engines]
        merged = (engines.union(*(comp[0] for comp in touching)), [j for comp in touching for j in comp[1]])
        components = [comp for comp in components if all(comp is not t for t in touching)]
        components.append((merged[0], [*merged[1], i]))
    return [sorted(labelers) for _, labelers in components]


def _tokens_read(engines: list[Any]) -> int:
    """What these engines have put through their networks so far (engines that do not count: 0)."""
    return sum(int(getattr(engine, "tokens_processed", 0)) for engine in engines)


def _shares(total: int, n: int) -> list[int]:
    """``total`` in ``n`` integer parts that add up to it (the first ones get the remainder)."""
    base, extra = divmod(total, n)
    return [base + (k < extra) for k in range(n)]


def label_jointly(
    labelers: Sequence[Labeler],
    prompts: pa.Table,
    responses: pa.Table,
    on_done: Callable[[int, Labelled], None] | None = None,
) -> list[Labelled]:
    """Every labeler's table for one shard, in order; those reading common engines in one pass each.

    ``on_done(i, labelled)`` hears of each labeler as soon as its table exists, so a caller can
    keep it before the next pass runs: a run killed in a later pass keeps what earlier ones read.
    """
    shard = Shard.of(prompts, responses)
    groups = shard.groups
    plans: dict[int, Plan] = {}
    own: dict[int, float] = {}
    out: dict[int, Labelled] = {}
    for i, labeler in enumerate(labelers):
        start = time.perf_counter()
        plan = labeler.plan(groups)
        own[i] = time.perf_counter() - start
        if plan is not None:
            plans[i] = plan
            continue
        tokens = tokens_through_models()
        table, stats = labeler.tabulate(shard, labeler.score_prompts(groups))
        seconds = time.perf_counter() - start
        out[i] = Labelled(table, stats, seconds, tokens_through_models() - tokens)
        if on_done is not None:
            on_done(i, out[i])
    for members in passes(plans):
        engines = list({id(engine): engine for i in members for engine, _ in plans[i].reads}.values())
        start, tokens = time.perf_counter(), _tokens_read(engines)
        answers = read_plans([plans[i] for i in members])
        pass_seconds, pass_tokens = time.perf_counter() - start, _tokens_read(engines) - tokens
        for i, answer, token_share in zip(members, answers, _shares(pass_tokens, len(members)), strict=True):
            start = time.perf_counter()
            table, stats = labelers[i].tabulate(shard, plans[i].finish(answer))
            seconds = own[i] + time.perf_counter() - start + pass_seconds / len(members)
            out[i] = Labelled(table, stats, seconds, token_share, len(members), pass_seconds, pass_tokens)
            if on_done is not None:
                on_done(i, out[i])
    return [out[i] for i in range(len(labelers))]
