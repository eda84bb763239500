"""The 0-5 rubric judge as a labeler: the expected rating from the rating tokens' probabilities, or the
mean of n sampled judgements parsed strictly (an unparseable one is dropped, never defaulted)."""

from __future__ import annotations

from statistics import fmean
from typing import Any

from schemas import columns, reasons
from schemas.recipe import PointwiseJudgeConfig
from steps.engines import Failed, OptionRequest, SamplingParams, derive_seed, load_engine
from steps.engines.base import Message, ReadResult
from steps.labelers.base import Labeler, Plan, PromptGroup, Score, regroup
from steps.labelers.judging import SCORE_OPTIONS, SCORE_PREFILL, normalised, parse_score, pointwise_prompt


class PointwiseJudgeLabeler(Labeler):
    def __init__(self, config: PointwiseJudgeConfig) -> None:
        self.signal = config.name
        self.config = config
        self.engine = load_engine(config.model)

    def plan(self, groups: list[PromptGroup]) -> Plan | None:
        if self.config.mode != "expected":  # sampled judgements are generated, not read
            return None
        texts = [text for g in groups for text in g.responses]
        requests = [OptionRequest(conv, SCORE_PREFILL, SCORE_OPTIONS) for conv in _judge_prompts(groups)]

        def finish(results: list[list[ReadResult]]) -> list[list[Score]]:
            [read] = results
            return regroup(groups, [_expected(t, res) for t, res in zip(texts, read, strict=True)])

        return Plan([(self.engine, requests)], finish)

    def score_prompts(self, groups: list[PromptGroup]) -> list[list[Score]]:
        if self.config.mode == "expected":
            return super().score_prompts(groups)
        prompts = [(g.prompt, text) for g in groups for text in g.responses]
        return regroup(groups, self._sampled(prompts, _judge_prompts(groups)))

    def _sampled(
        self, prompts: list[tuple[dict[str, Any], str]], conversations: list[list[Message]]
    ) -> list[Score]:
        params = SamplingParams(self.config.n, self.config.temperature, 1.0, self.config.max_tokens)
        seeds = [derive_seed("judge", p[columns.PROMPT_ID], text) for p, text in prompts]
        scores = []
        for (_, text), result in zip(
            prompts, self.engine.generate(conversations, params, seeds), strict=True
        ):
            if not text.strip():
                scores.append(Score(None, reasons.EMPTY_RESPONSE))
                continue
            if isinstance(result, Failed):
                scores.append(Score(None, result.reason))
                continue
            ratings = [parse_score(j.text) for j in result]
            parsed = [r for r in ratings if r is not None]
            details = {"ratings": ratings, "parsed": len(parsed), "judged": len(ratings)}
            missed = len(ratings) - len(parsed)
            unparsed = {reasons.JUDGEMENT_UNPARSEABLE: missed} if missed else {}
            if not parsed:
                scores.append(Score(None, reasons.JUDGE_UNPARSEABLE, details, unparsed))
            else:  # the unparsed verdicts are left out of the mean, never read as a rating
                scores.append(Score(fmean(parsed), details=details, counts=unparsed))
        return scores


def _judge_prompts(groups: list[PromptGroup]) -> list[list[Message]]:
    """The rubric prompt of every response, in order."""
    return [
        pointwise_prompt(g.prompt[columns.MESSAGES], text, g.responses)
        for g in groups
        for text in g.responses
    ]


def _expected(text: str, result: ReadResult) -> Score:
    """The expected rating under the rating tokens' probabilities."""
    if not text.strip():
        return Score(None, reasons.EMPTY_RESPONSE)
    if isinstance(result, Failed):
        return Score(None, result.reason)
    assert isinstance(result, dict)
    probs = normalised(result)
    expected = sum(int(k) * p for k, p in probs.items())
    return Score(expected, details={"probs": {k: round(v, 6) for k, v in probs.items()}})
