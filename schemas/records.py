"""Arrow schemas of the four tables that move between stages.

Stages exchange Parquet shards with exactly these schemas; ``conform`` is the one
place a table is checked against its contract, so a step that drifts fails at
its own boundary rather than three stages later.
"""

from __future__ import annotations

import pyarrow as pa

from schemas import columns as c

MESSAGE = pa.struct([pa.field(c.ROLE, pa.string()), pa.field(c.CONTENT, pa.string())])
CONVERSATION = pa.list_(MESSAGE)

PROMPTS = pa.schema(
    [
        pa.field(c.PROMPT_ID, pa.string(), nullable=False),
        pa.field(c.MESSAGES, CONVERSATION, nullable=False),
        pa.field(c.REFERENCES, pa.list_(pa.string())),
        pa.field(c.SOURCE, pa.string()),
        pa.field(c.SOURCE_ROW, pa.int64()),
    ]
)

RESPONSES = pa.schema(
    [
        pa.field(c.PROMPT_ID, pa.string(), nullable=False),
        pa.field(c.RESPONSE_ID, pa.string(), nullable=False),
        pa.field(c.SAMPLE_INDEX, pa.int32(), nullable=False),
        pa.field(c.TEXT, pa.string(), nullable=False),
        pa.field(c.FINISH_REASON, pa.string(), nullable=False),
        pa.field(c.TRUNCATED, pa.bool_(), nullable=False),
        pa.field(c.IS_EMPTY, pa.bool_(), nullable=False),
        pa.field(c.NUM_TOKENS, pa.int32(), nullable=False),
        pa.field(c.PROMPT_TOKENS, pa.int32(), nullable=False),
        pa.field(c.PROMPT_TURNS_DROPPED, pa.int32(), nullable=False),
        pa.field(c.POLICY_MODEL, pa.string(), nullable=False),
        pa.field(c.ENGINE, pa.string(), nullable=False),
        pa.field(c.TEMPERATURE, pa.float64(), nullable=False),
        pa.field(c.TOP_P, pa.float64(), nullable=False),
        pa.field(c.MAX_TOKENS, pa.int32(), nullable=False),
        pa.field(c.SEED, pa.int64(), nullable=False),
    ]
)

LABELS = pa.schema(
    [
        pa.field(c.PROMPT_ID, pa.string(), nullable=False),
        pa.field(c.RESPONSE_ID, pa.string(), nullable=False),
        pa.field(c.SIGNAL, pa.string(), nullable=False),
        # null score <=> reason says why the response could not be scored
        pa.field(c.SCORE, pa.float64()),
        pa.field(c.REASON, pa.string()),
        # JSON object with signal-specific settings and sub-scores
        pa.field(c.DETAILS, pa.string()),
    ]
)

_PAIR_BASE = [
    pa.field(c.PROMPT_ID, pa.string(), nullable=False),
    pa.field(c.PROMPT, CONVERSATION, nullable=False),
    pa.field(c.CHOSEN, CONVERSATION, nullable=False),
    pa.field(c.REJECTED, CONVERSATION, nullable=False),
    pa.field(c.SCORE_CHOSEN, pa.float64(), nullable=False),
    pa.field(c.SCORE_REJECTED, pa.float64(), nullable=False),
    pa.field(c.MARGIN, pa.float64(), nullable=False),
    pa.field(c.CHOSEN_ID, pa.string(), nullable=False),
    pa.field(c.REJECTED_ID, pa.string(), nullable=False),
]

# Provenance carried for each side of a pair, typed as in RESPONSES.
PAIR_SIDE_FIELDS = (c.FINISH_REASON, c.NUM_TOKENS, c.SEED)

_PAIR_TAIL = [
    pa.field(c.POLICY_MODEL, pa.string(), nullable=False),
    pa.field(c.ENGINE, pa.string(), nullable=False),
    pa.field(c.TEMPERATURE, pa.float64(), nullable=False),
    pa.field(c.TOP_P, pa.float64(), nullable=False),
    pa.field(c.MAX_TOKENS, pa.int32(), nullable=False),
    # >0: the prompt above is the conversation the policy saw, its oldest turns left out
    pa.field(c.PROMPT_TURNS_DROPPED, pa.int32(), nullable=False),
    pa.field(c.JUDGE_P_CHOSEN, pa.float64()),
    pa.field(c.JUDGE_SWAP_AGREE, pa.bool_()),
    pa.field(c.AGREEMENT, pa.float64()),
    pa.field(c.STRENGTH_MEAN, pa.float64()),
    pa.field(c.STRENGTH_STD, pa.float64()),
    pa.field(c.CONSISTENCY, pa.float64()),
    pa.field(c.P_CHOSEN, pa.float64()),
    pa.field(c.PAIR_RULE, pa.string(), nullable=False),
    pa.field(c.RECIPE_HASH, pa.string(), nullable=False),
]


def pairs_schema(signals: list[str]) -> pa.Schema:
    """The pairs contract for a recipe: fixed columns plus one score column per signal and side."""
    fields = list(_PAIR_BASE)
    for signal in signals:
        for side in (c.CHOSEN, c.REJECTED):
            fields.append(pa.field(c.signal_column(signal, side), pa.float64()))
    for side in (c.CHOSEN, c.REJECTED):
        for name in PAIR_SIDE_FIELDS:
            fields.append(pa.field(c.side_column(name, side), RESPONSES.field(name).type))
    return pa.schema(fields + _PAIR_TAIL)


def dropped_schema(signals: list[str]) -> pa.Schema:
    """Pairs the consistency stage dropped: the same columns plus why."""
    return pairs_schema(signals).append(pa.field(c.DROP_REASON, pa.string(), nullable=False))


class SchemaMismatch(ValueError):
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
