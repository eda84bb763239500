"""Every reason code a user can see: in ``drop_reason``, a label's ``reason``, the stats, the card.

One place, so a code is spelled once, and so README's drop tables can be checked against it.
Each code is grouped by the stage that records it; the comment says what it means.
"""

from __future__ import annotations

# --- prompts: a row of the prompt source is dropped
EMPTY_PROMPT = "empty_prompt"  # no messages, or the last user turn is empty/whitespace
INVALID_PROMPT = "invalid_prompt"  # not a message list, assistant turn last, system message not first
UNKNOWN_ROLE = "unknown_role"  # a role other than system/user/assistant
NON_STRING_CONTENT = "non_string_content"  # message content or a reference that is not a string
INVALID_UNICODE = "invalid_unicode"  # an escaped unpaired surrogate
DUPLICATE_PROMPT = "duplicate_prompt"  # the same conversation as an earlier row, after normalisation
INVALID_REFERENCES = "invalid_references"  # references neither a string nor a list (a number, a mapping)
CONTAMINATED_PREFIX = "contaminated:"  # + an eval set's name: the prompt overlaps that set (decontaminate)
NEAR_DUPLICATE = "near_duplicate"  # MinHash-similar to an earlier kept prompt (prompts.near_duplicates)


def contaminated(set_name: str) -> str:
    """The drop code of a prompt that overlaps the evaluation set ``set_name``."""
    return f"{CONTAMINATED_PREFIX}{set_name}"


# --- decontamination: an eval set's row that cannot be indexed (counted with the set, not a prompt drop)
NO_WORDS = "no_words"  # the eval prompt has no word characters, so no n-gram can match it

# --- eval pairs (flows/eval_labelers.py): a row of a human-labelled pairs file is skipped; the
# prompt codes above apply to its prompt and reference, INVALID_UNICODE to chosen/rejected too
NOT_AN_OBJECT = "not_an_object"  # a JSON line that is not an object
INVALID_RESPONSE = "invalid_response"  # chosen or rejected missing or not a string

# --- sampling: a prompt gets no responses
PROMPT_TOO_LONG = "prompt_too_long"  # the prompt plus max_tokens does not fit the policy's context

# --- engines: a request fails (the labeler's score is null with this reason)
TOO_LONG = "too_long"  # context + continuation exceed the scorer's n_ctx
TEMPLATE_BOUNDARY = "template_boundary"  # the chat template rewrites earlier tokens when a turn is added
EMPTY_CONTINUATION = "empty_continuation"  # nothing to score
NO_CONTEXT = "no_context"  # the chat template puts nothing before the continuation
OPTION_NOT_SINGLE_TOKEN = "option_not_single_token"  # a judge option that is not one token after the prefill
ENGINE_ERROR = "engine_error"  # the engine answered something unusable (vLLM: a missing log-prob)
INTERNAL = "internal"  # a request the engine never answered: a bug, reported rather than hidden

# --- labelers: a response's score is null
EMPTY_RESPONSE = "empty_response"  # the response is empty or whitespace
NO_REFERENCES = "no_references"  # BLEU without reference answers
NON_FINITE_SCORE = "non_finite_score"  # NaN or ±inf from a labeler
JUDGE_UNPARSEABLE = "judge_unparseable"  # no sampled judgement had a strict "Score: N" line
JUDGEMENT_UNPARSEABLE = "judgement_unparseable"  # (a count) one sampled judgement without that line
FEWER_THAN_TWO_REPLIES = "fewer_than_two_replies"  # a round robin needs two non-empty replies
UNSCORED = "unscored"  # a labeler gave no value and no reason
NON_FINITE_VERDICT = "non_finite_verdict"  # a pair judge's NaN verdict (the pair is kept, verdict null)

# --- pairing: a prompt makes no pair
IDENTICAL_SAMPLES = "identical_samples"  # all responses the same text (ignoring case and spacing)
FEWER_THAN_TWO_FINISHED = "fewer_than_two_finished"  # pairing.finished_only left under two answers
UNSCORED_PREFIX = "unscored:"  # + the labels' reason: no response of the prompt has an aggregate score
FEWER_THAN_TWO_SCORED = "fewer_than_two_scored"
ALL_TIED = "all_tied"  # every scored response has the same aggregate
BELOW_MARGIN = "below_margin"  # no response is below the best by more than pairing.min_margin
IDENTICAL_TEXT = "identical_text"  # the only candidates below the best have its text
LENGTH_RATIO = "length_ratio"  # every candidate pair differs in length by more than length_control.max_ratio
CUT_ANSWERS_NOT_PAIRED = "cut_answers_not_paired"  # (a count) answers finished_only left out
LENGTH_RATIO_NEXT_BEST = (
    "length_ratio_next_best"  # (a count) pairs whose best response had no partner within max_ratio
)

# --- consistency: a candidate pair is dropped (``drop_reason``), in the order the rules run
IDENTICAL_PAIR = "identical_pair"
SIGN_DISAGREEMENT = "sign_disagreement"  # fewer than consistency.min_agree signals prefer chosen
JUDGE_SWAP_DISAGREEMENT = "judge_swap_disagreement"  # the pair judge's two orders disagree
LIKELY_MISLABELED = "likely_mislabeled"  # strength_mean <= 0
AMBIGUOUS = "ambiguous"  # strength_mean below ambiguous_below / the ambiguous_quantile cut
RANK_INCONSISTENT = "rank_inconsistent"  # rank consistency of the two rank_signals below the minimum
LENGTH_ONLY = "length_only"  # chosen much longer and not every signal agrees (length_guard)
