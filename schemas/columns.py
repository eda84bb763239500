"""Column names, defined once so no step retypes a string another step depends on."""

# Shared identifiers
PROMPT_ID = "prompt_id"
RESPONSE_ID = "response_id"

# Prompts table
MESSAGES = "messages"
REFERENCES = "references"
SOURCE = "source"
SOURCE_ROW = "source_row"

# Messages inside conversational columns
ROLE = "role"
CONTENT = "content"

# Responses table
SAMPLE_INDEX = "sample_index"
TEXT = "text"
FINISH_REASON = "finish_reason"
TRUNCATED = "truncated"
IS_EMPTY = "is_empty"
NUM_TOKENS = "num_tokens"
PROMPT_TOKENS = "prompt_tokens"
# Oldest non-system messages left out so the prompt fit the context (sampling.too_long: truncate_left)
PROMPT_TURNS_DROPPED = "prompt_turns_dropped"
POLICY_MODEL = "policy_model"
ENGINE = "engine"
TEMPERATURE = "temperature"
TOP_P = "top_p"
MAX_TOKENS = "max_tokens"
SEED = "seed"

# Labels table (long format: one row per response and signal)
SIGNAL = "signal"
SCORE = "score"
REASON = "reason"
DETAILS = "details"

# Pairs table (TRL conversational preference format + provenance)
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
SCORE_CHOSEN = "score_chosen"
SCORE_REJECTED = "score_rejected"
MARGIN = "margin"
CHOSEN_ID = "chosen_id"
REJECTED_ID = "rejected_id"
PAIR_RULE = "pair_rule"
# Pairwise judge on the candidate pair: P(chosen wins) over both orders, and order agreement
JUDGE_P_CHOSEN = "judge_p_chosen"
JUDGE_SWAP_AGREE = "judge_swap_agree"
# Consistency evidence per pair (docs/design.md, Aggregation and consistency)
AGREEMENT = "agreement"  # share of signals preferring chosen (k/m)
STRENGTH_MEAN = "strength_mean"  # mean over signals of the z-scored chosen-rejected difference
STRENGTH_STD = "strength_std"
CONSISTENCY = "consistency"  # (Kendall tau + 1) / 2 between two signals over the prompt's responses
P_CHOSEN = "p_chosen"  # soft label: logistic of strength_mean
DROP_REASON = "drop_reason"
RECIPE_HASH = "recipe_hash"


def signal_column(signal: str, side: str) -> str:
    """Per-signal score column of a pair, e.g. ``score_bleu_chosen``."""
    if side not in (CHOSEN, REJECTED):
        raise ValueError(f"side must be {CHOSEN!r} or {REJECTED!r}, got {side!r}")
    return f"score_{signal}_{side}"


def side_column(name: str, side: str) -> str:
    """Per-side provenance column of a pair, e.g. ``chosen_finish_reason``."""
    return f"{side}_{name}"
