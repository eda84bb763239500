"""Density ratio (CDR): how much more a "strong" reader likes a response than a "weak" one.

score = Σ log p_strong(y_t | x, y_<t) − Σ log p_weak(y_t | x, y_<t) over the
response's content tokens only (no prompt, template or end-of-turn tokens),
optionally divided by the token count. Each side is a model plus what it is
told first (a criteria system prompt, an exemplar). On the CPU default both
sides are the same small model, once with criteria and once without: one model
loaded once, two contexts.
"""

from __future__ import annotations

from typing import Any

from schemas import columns, reasons
from schemas.recipe import ContrastSide, DensityRatioConfig
from steps.engines import Failed, ScoreRequest, load_engine
from steps.engines.base import Message, ReadResult
from steps.labelers.base import Labeler, Plan, PromptGroup, Score, regroup


def side_context(side: ContrastSide, messages: list[Message]) -> list[Message]:
    """The prompt as one side sees it: criteria merged into (or added as) the system turn, exemplar next."""
    messages = [dict(m) for m in messages]
    head: list[Message] = []
    if messages and messages[0][columns.ROLE] == "system":
        head = [messages.pop(0)]
    if side.system_prompt:
        if head:
            head[0][columns.CONTENT] = f"{side.system_prompt}\n\n{head[0][columns.CONTENT]}"
        else:
            head = [{columns.ROLE: "system", columns.CONTENT: side.system_prompt}]
    if side.exemplar:
        head += [
            {columns.ROLE: "user", columns.CONTENT: side.exemplar.prompt},
            {columns.ROLE: "assistant", columns.CONTENT: side.exemplar.response},
        ]
    return head + messages


class DensityRatioLabeler(Labeler):
    def __init__(self, config: DensityRatioConfig) -> None:
        self.signal = config.name
        self.config = config
        self.strong = load_engine(config.strong.model)
        self.weak = load_engine(config.weak.model)  # the same object when both sides share a model

    def plan(self, groups: list[PromptGroup]) -> Plan:
        strong_requests, weak_requests = [], []
        for group in groups:
            strong_ctx = side_context(self.config.strong, group.prompt[columns.MESSAGES])
            weak_ctx = side_context(self.config.weak, group.prompt[columns.MESSAGES])
            strong_requests += [ScoreRequest(strong_ctx, text) for text in group.responses]
            weak_requests += [ScoreRequest(weak_ctx, text) for text in group.responses]

        def finish(results: list[list[ReadResult]]) -> list[list[Score]]:
            strong, weak = results
            return regroup(groups, [self._score(s, w) for s, w in zip(strong, weak, strict=True)])

        # Two sides on one engine are read in one pass (read_plans pools requests by engine).
        return Plan([(self.strong, strong_requests), (self.weak, weak_requests)], finish)

    def _score(self, strong: Any, weak: Any) -> Score:
        for side in (strong, weak):
            if isinstance(side, Failed):
                reason = reasons.EMPTY_RESPONSE if side.reason == reasons.EMPTY_CONTINUATION else side.reason
                return Score(None, reason)
        ratio = strong.total - weak.total
        tokens = len(strong.logprobs)
        value = ratio if self.config.reduce == "sum" else ratio / max(1, tokens)
        details = {
            "strong_logp": strong.total,
            "weak_logp": weak.total,
            "tokens": tokens,
            "mean_ratio": ratio / max(1, tokens),
        }
        return Score(value, details=details)
