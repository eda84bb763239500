"""Arrow schemas of the four tables that move between stages.

Stages exchange Parquet shards with exactly these schemas; ``conform`` is the one
place a table is checked against its contract, so a step that drifts fails at
its own boundary rather than three stages later.
"""

from __future__ import annotations

import pyarrow as pa

from schemas import columns
from schemas.errors import RunError

MESSAGE = pa.struct([pa.field(columns.ROLE, pa.string()), pa.field(columns.CONTENT, pa.string())])
CONVERSATION = pa.list_(MESSAGE)

PROMPTS = pa.schema(
    [
        pa.field(columns.PROMPT_ID, pa.string(), nullable=False),
        pa.field(columns.MESSAGES, CONVERSATION, nullable=False),
        pa.field(columns.REFERENCES, pa.list_(pa.string())),
        pa.field(columns.SOURCE, pa.string()),
        pa.field(columns.SOURCE_ROW, pa.int64()),
    ]
)

RESPONSES = pa.schema(
    [
        pa.field(columns.PROMPT_ID, pa.string(), nullable=False),
        pa.field(columns.RESPONSE_ID, pa.string(), nullable=False),
        pa.field(columns.SAMPLE_INDEX, pa.int32(), nullable=False),
        pa.field(columns.TEXT, pa.string(), nullable=False),
        pa.field(columns.FINISH_REASON, pa.string(), nullable=False),
        pa.field(columns.TRUNCATED, pa.bool_(), nullable=False),
        pa.field(columns.IS_EMPTY, pa.bool_(), nullable=False),
        pa.field(columns.NUM_TOKENS, pa.int32(), nullable=False),
        pa.field(columns.PROMPT_TOKENS, pa.int32(), nullable=False),
        pa.field(columns.PROMPT_TURNS_DROPPED, pa.int32(), nullable=False),
        pa.field(columns.POLICY_MODEL, pa.string(), nullable=False),
        pa.field(columns.ENGINE, pa.string(), nullable=False),
        pa.field(columns.TEMPERATURE, pa.float64(), nullable=False),
        pa.field(columns.TOP_P, pa.float64(), nullable=False),
        pa.field(columns.MAX_TOKENS, pa.int32(), nullable=False),
        pa.field(columns.SEED, pa.int64(), nullable=False),
    ]
)

LABELS = pa.schema(
    [
        pa.field(columns.PROMPT_ID, pa.string(), nullable=False),
        pa.field(columns.RESPONSE_ID, pa.string(), nullable=False),
        pa.field(columns.SIGNAL, pa.string(), nullable=False),
        # null score <=> reason says why the response could not be scored
        pa.field(columns.SCORE, pa.float64()),
        pa.field(columns.REASON, pa.string()),
        # JSON object with signal-specific settings and sub-scores
        pa.field(columns.DETAILS, pa.string()),
    ]
)

_PAIR_BASE = [
    pa.field(columns.PROMPT_ID, pa.string(), nullable=False),
    pa.field(columns.PROMPT, CONVERSATION, nullable=False),
    pa.field(columns.CHOSEN, CONVERSATION, nullable=False),
    pa.field(columns.REJECTED, CONVERSATION, nullable=False),
    pa.field(columns.SCORE_CHOSEN, pa.float64(), nullable=False),
    pa.field(columns.SCORE_REJECTED, pa.float64(), nullable=False),
    pa.field(columns.MARGIN, pa.float64(), nullable=False),
    pa.field(columns.CHOSEN_ID, pa.string(), nullable=False),
    pa.field(columns.REJECTED_ID, pa.string(), nullable=False),
]

# Provenance carried for each side of a pair, typed as in RESPONSES.
PAIR_SIDE_FIELDS = (columns.FINISH_REASON, columns.NUM_TOKENS, columns.SEED)

_PAIR_TAIL = [
    pa.field(columns.POLICY_MODEL, pa.string(), nullable=False),
    pa.field(columns.ENGINE, pa.string(), nullable=False),
    pa.field(columns.TEMPERATURE, pa.float64(), nullable=False),
    pa.field(columns.TOP_P, pa.float64(), nullable=False),
    pa.field(columns.MAX_TOKENS, pa.int32(), nullable=False),
    # >0: the prompt above is the conversation the policy saw, its oldest turns left out
    pa.field(columns.PROMPT_TURNS_DROPPED, pa.int32(), nullable=False),
    pa.field(columns.JUDGE_P_CHOSEN, pa.float64()),
    pa.field(columns.JUDGE_SWAP_AGREE, pa.bool_()),
    pa.field(columns.AGREEMENT, pa.float64()),
    pa.field(columns.STRENGTH_MEAN, pa.float64()),
    pa.field(columns.STRENGTH_STD, pa.float64()),
    pa.field(columns.CONSISTENCY, pa.float64()),
    pa.field(columns.P_CHOSEN, pa.float64()),
    pa.field(columns.PAIR_RULE, pa.string(), nullable=False),
    pa.field(columns.RECIPE_HASH, pa.string(), nullable=False),
]


def pairs_schema(signals: list[str]) -> pa.Schema:
    """The pairs contract for a recipe: fixed columns plus one score column per signal and side."""
    fields = list(_PAIR_BASE)
    for signal in signals:
        for side in (columns.CHOSEN, columns.REJECTED):
            fields.append(pa.field(columns.signal_column(signal, side), pa.float64()))
    for side in (columns.CHOSEN, columns.REJECTED):
        for name in PAIR_SIDE_FIELDS:
            fields.append(pa.field(columns.side_column(name, side), RESPONSES.field(name).type))
    return pa.schema(fields + _PAIR_TAIL)


def dropped_schema(signals: list[str]) -> pa.Schema:
    """Pairs the consistency stage dropped: the same columns plus why."""
    return pairs_schema(signals).append(pa.field(columns.DROP_REASON, pa.string(), nullable=False))


class SchemaMismatch(RunError, ValueError):
    """A table does not match its contract; the message names the column."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order and types, or raise naming the gap."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SchemaMismatch(f"{what}: missing column(s) {missing}; expected {schema.names}")
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise SchemaMismatch(f"{what}: unexpected column(s) {extra}; expected {schema.names}")
    table = table.select(schema.names)
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatch(f"{what}: cannot cast to contract: {exc}") from exc
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaMismatch(f"{what}: column {field.name!r} has nulls but may not")
    return table
