"""The 0-5 rubric judge as a labeler: the expected rating from the rating tokens' probabilities, or the
mean of n sampled judgements parsed strictly (an unparseable one is dropped, never defaulted)."""

from __future__ import annotations

from statistics import fmean
from typing import Any

from schemas import columns as c
from schemas import reasons as r
from schemas.recipe import PointwiseJudgeConfig
from steps.engines import Failed, OptionRequest, SamplingParams, derive_seed, load_engine
from steps.engines.base import Message
from steps.judges import SCORE_OPTIONS, SCORE_PREFILL, normalised, parse_score, pointwise_prompt
from steps.labelers.base import Labeler, PromptGroup, Score, regroup


class PointwiseJudgeLabeler(Labeler):
    def __init__(self, config: PointwiseJudgeConfig) -> None:
        self.signal = config.name
        self.config = config
        self.engine = load_engine(config.model)

    def score_prompts(self, groups: list[PromptGroup]) -> list[list[Score]]:
        prompts = [(g.prompt, text) for g in groups for text in g.responses]
        judged = [
            pointwise_prompt(g.prompt[c.MESSAGES], text, g.responses) for g in groups for text in g.responses
        ]
        if self.config.mode == "expected":
            flat = self._expected(prompts, judged)
        else:
            flat = self._sampled(prompts, judged)
        return regroup(groups, flat)

    def _expected(
        self, prompts: list[tuple[dict[str, Any], str]], judged: list[list[Message]]
    ) -> list[Score]:
        requests = [OptionRequest(conversation, SCORE_PREFILL, SCORE_OPTIONS) for conversation in judged]
        scores = []
        for (_, text), result in zip(prompts, self.engine.option_logprobs(requests), strict=True):
            if not text.strip():
                scores.append(Score(None, r.EMPTY_RESPONSE))
            elif isinstance(result, Failed):
                scores.append(Score(None, result.reason))
            else:
                probs = normalised(result)
                expected = sum(int(k) * p for k, p in probs.items())
                scores.append(Score(expected, details={"probs": {k: round(v, 6) for k, v in probs.items()}}))
        return scores

    def _sampled(
        self, prompts: list[tuple[dict[str, Any], str]], conversations: list[list[Message]]
    ) -> list[Score]:
        params = SamplingParams(self.config.n, self.config.temperature, 1.0, self.config.max_tokens)
        seeds = [derive_seed("judge", p[c.PROMPT_ID], text) for p, text in prompts]
        scores = []
        for (_, text), result in zip(
            prompts, self.engine.generate(conversations, params, seeds), strict=True
        ):
            if not text.strip():
                scores.append(Score(None, r.EMPTY_RESPONSE))
                continue
            if isinstance(result, Failed):
                scores.append(Score(None, result.reason))
                continue
            ratings = [parse_score(j.text) for j in result]
            parsed = [r for r in ratings if r is not None]
            details = {"ratings": ratings, "parsed": len(parsed), "judged": len(ratings)}
            missed = len(ratings) - len(parsed)
            unparsed = {r.JUDGEMENT_UNPARSEABLE: missed} if missed else {}
            if not parsed:
                scores.append(Score(None, r.JUDGE_UNPARSEABLE, details, unparsed))
            else:  # the unparsed verdicts are left out of the mean, never read as a rating
                scores.append(Score(fmean(parsed), details=details, counts=unparsed))
        return scores
