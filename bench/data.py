"""Benchmark inputs made from our built-in prompt set, and the null engine.

Responses are the built-in reference answers with words dropped, replaced and swapped,
so n-gram overlaps (what BLEU and the writer's compression see) look like real answers
rather than random words. Everything is seeded: a rerun measures the same work.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import pyarrow as pa

from schemas import columns
from schemas.recipe import BuiltinPrompts
from schemas.records import PROMPTS, RESPONSES
from steps.engines.base import Completion, Conversation, Failed, SamplingParams, sample_seed
from steps.prompts.normalise import load_prompts, prompt_id


@lru_cache(maxsize=1)
def builtin() -> tuple[tuple[tuple[dict[str, str], ...], tuple[str, ...]], ...]:
    """(messages, references) of every built-in prompt, read by the pipeline's own loader."""
    table, _ = load_prompts(BuiltinPrompts())
    return tuple(
        (tuple(messages), tuple(refs or ()))
        for messages, refs in zip(
            table.column(columns.MESSAGES).to_pylist(),
            table.column(columns.REFERENCES).to_pylist(),
            strict=True,
        )
    )


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(sorted({w for _, refs in builtin() for ref in refs for w in ref.split()}))


def perturb(text: str, rng: random.Random) -> str:
    """A plausible answer near ``text``: a window of it with words dropped, replaced, swapped."""
    words = text.split()
    vocabulary = _vocabulary()
    keep = max(1, int(len(words) * rng.uniform(0.5, 1.0)))
    start = rng.randrange(0, len(words) - keep + 1)
    out: list[str] = []
    for word in words[start : start + keep]:
        roll = rng.random()
        if roll < 0.12:
            continue
        out.append(rng.choice(vocabulary) if roll < 0.22 else word)
    for i in range(len(out) - 1):
        if rng.random() < 0.05:
            out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def prompts_table(n: int, seed: int = 0) -> pa.Table:
    """``n`` distinct prompts cycling through the built-in set (a variant number keeps ids unique)."""
    rows: dict[str, list[Any]] = {
        name: [] for name in (columns.PROMPT_ID, columns.MESSAGES, columns.REFERENCES)
    }
    rows.update({columns.SOURCE: [], columns.SOURCE_ROW: []})
    # Two references each, as the BLEU workload asks (one built-in prompt has a single one).
    base = [(messages, refs[:2]) for messages, refs in builtin() if len(refs) >= 2]
    for i in range(n):
        messages, refs = base[i % len(base)]
        messages = [dict(m) for m in messages]
        if i >= len(base):
            last = messages[-1]
            last[columns.CONTENT] = f"{last[columns.CONTENT]} (variant {i // len(base)})"
        rows[columns.PROMPT_ID].append(prompt_id(messages))
        rows[columns.MESSAGES].append(messages)
        rows[columns.REFERENCES].append(list(refs))
        rows[columns.SOURCE].append(f"bench:{seed}")
        rows[columns.SOURCE_ROW].append(i)
    return complete(rows, PROMPTS)


_RESPONSE_COLUMNS = (
    columns.PROMPT_ID, columns.RESPONSE_ID, columns.SAMPLE_INDEX, columns.TEXT, columns.FINISH_REASON,
    columns.TRUNCATED, columns.IS_EMPTY, columns.NUM_TOKENS, columns.PROMPT_TOKENS, columns.POLICY_MODEL,
    columns.ENGINE, columns.TEMPERATURE, columns.TOP_P, columns.MAX_TOKENS, columns.SEED,
)  # fmt: skip


def responses_table(prompts: pa.Table, per_prompt: int, seed: int = 0) -> pa.Table:
    """``per_prompt`` perturbed references per prompt, in the RESPONSES contract."""
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {name: [] for name in _RESPONSE_COLUMNS}
    for pid, refs in zip(
        prompts.column(columns.PROMPT_ID).to_pylist(),
        prompts.column(columns.REFERENCES).to_pylist(),
        strict=True,
    ):
        for index in range(per_prompt):
            text = perturb(rng.choice(refs), rng) if refs else "no reference to start from"
            rows[columns.PROMPT_ID].append(pid)
            rows[columns.RESPONSE_ID].append(f"{pid}-{index}")
            rows[columns.SAMPLE_INDEX].append(index)
            rows[columns.TEXT].append(text)
            rows[columns.FINISH_REASON].append("stop")
            rows[columns.TRUNCATED].append(False)
            rows[columns.IS_EMPTY].append(not text.strip())
            rows[columns.NUM_TOKENS].append(len(text.split()))
            rows[columns.PROMPT_TOKENS].append(32)
            rows[columns.POLICY_MODEL].append(NullEngine.model_id)
            rows[columns.ENGINE].append(NullEngine.engine_name)
            rows[columns.TEMPERATURE].append(0.8)
            rows[columns.TOP_P].append(0.95)
            rows[columns.MAX_TOKENS].append(128)
            rows[columns.SEED].append(sample_seed(seed, len(rows[columns.SEED])))
    return complete(rows, RESPONSES)


def complete(rows: dict[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """A table in ``schema`` from the columns we know; columns added to the contract later get
    their type's neutral value (null where allowed), so the bench follows the schema as it grows."""
    n = max((len(v) for v in rows.values() if v), default=0)
    arrays = {}
    for field in schema:
        values = rows.get(field.name)
        if values is None or (not values and n):
            if field.nullable:
                arrays[field.name] = pa.nulls(n, field.type)
                continue
            neutral = pa.scalar(None, field.type)
            for candidate in (0, False, ""):
                try:
                    neutral = pa.scalar(candidate, field.type)
                    break
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
                    continue
            arrays[field.name] = pa.array([neutral.as_py()] * n, field.type)
        else:
            arrays[field.name] = pa.array(values, field.type)
    return pa.Table.from_pydict(arrays, schema=schema)


class NullEngine:
    """A ``Generator`` that answers instantly with canned texts chosen by each sample's seed.

    It stands in for the model where the model is not what is measured (scaling), so the
    numbers are the pipeline's own cost; the same seeds give the same answers on every run.
    """

    model_id = "bench/null-engine"
    engine_name = "null"

    def __init__(self, pool_size: int = 512, seed: int = 0) -> None:
        rng = random.Random(seed)
        references = [ref for _, refs in builtin() for ref in refs]
        self.pool = [perturb(rng.choice(references), rng) for _ in range(pool_size)]

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        out: list[list[Completion] | Failed] = []
        for _, base in zip(conversations, seeds, strict=True):
            samples = []
            for i in range(params.n):
                seed = sample_seed(base, i)
                text = self.pool[seed % len(self.pool)]
                tokens = min(params.max_tokens, len(text.split()))
                finish = "length" if tokens >= params.max_tokens else "stop"
                samples.append(Completion(text, tokens, finish, 32, seed))
            out.append(samples)
        return out


def pairs_table(n: int, signals: list[str], seed: int = 0) -> pa.Table:
    """``n`` chosen/rejected pairs in the pairs contract for ``signals`` (what the writer publishes)."""
    from schemas.records import pairs_schema

    rng = random.Random(seed)
    prompts = prompts_table(n, seed)
    rows: dict[str, list[Any]] = {
        columns.PROMPT_ID: prompts.column(columns.PROMPT_ID).to_pylist(),
        columns.PROMPT: prompts.column(columns.MESSAGES).to_pylist(),
    }
    refs = prompts.column(columns.REFERENCES).to_pylist()
    chosen = [perturb(r[0], rng) for r in refs]
    rejected = [perturb(r[-1], rng) for r in refs]
    rows[columns.CHOSEN] = [[{columns.ROLE: "assistant", columns.CONTENT: t}] for t in chosen]
    rows[columns.REJECTED] = [[{columns.ROLE: "assistant", columns.CONTENT: t}] for t in rejected]
    high = [rng.uniform(10, 60) for _ in range(n)]
    low = [h - rng.uniform(0.1, 10) for h in high]
    rows[columns.SCORE_CHOSEN], rows[columns.SCORE_REJECTED] = high, low
    rows[columns.MARGIN] = [h - lo for h, lo in zip(high, low, strict=True)]
    rows[columns.CHOSEN_ID] = [f"{pid}-0" for pid in rows[columns.PROMPT_ID]]
    rows[columns.REJECTED_ID] = [f"{pid}-1" for pid in rows[columns.PROMPT_ID]]
    for signal in signals:
        rows[columns.signal_column(signal, columns.CHOSEN)] = high
        rows[columns.signal_column(signal, columns.REJECTED)] = low
    for side, texts in ((columns.CHOSEN, chosen), (columns.REJECTED, rejected)):
        rows[columns.side_column(columns.FINISH_REASON, side)] = ["stop"] * n
        rows[columns.side_column(columns.NUM_TOKENS, side)] = [len(t.split()) for t in texts]
        rows[columns.side_column(columns.SEED, side)] = [rng.randrange(2**31) for _ in range(n)]
    rows[columns.POLICY_MODEL] = [NullEngine.model_id] * n
    rows[columns.ENGINE] = [NullEngine.engine_name] * n
    rows[columns.TEMPERATURE], rows[columns.TOP_P], rows[columns.MAX_TOKENS] = (
        [0.8] * n,
        [0.95] * n,
        [128] * n,
    )
    rows[columns.AGREEMENT] = [1.0] * n
    rows[columns.STRENGTH_MEAN] = [1.0] * n
    rows[columns.P_CHOSEN] = [0.73] * n
    rows[columns.PAIR_RULE] = ["best_vs_worst"] * n
    return complete(rows, pairs_schema(signals))
