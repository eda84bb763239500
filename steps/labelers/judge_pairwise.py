"""The round-robin pairwise judge as a labeler: every two replies of a prompt judged in both orders,
each reply's score its Bradley-Terry log-strength over the prompt's replies."""

from __future__ import annotations

import itertools
from statistics import fmean

from schemas import columns, reasons
from schemas.recipe import PairwiseJudgeConfig
from steps.engines import Failed, load_engine
from steps.engines.base import ReadResult
from steps.labelers.base import Labeler, Plan, PromptGroup, Score
from steps.labelers.judging import Verdict, bradley_terry, pair_requests, pair_verdicts


class PairwiseJudgeLabeler(Labeler):
    """Round-robin over a prompt's replies; each reply's score is its Bradley-Terry log-strength."""

    def __init__(self, config: PairwiseJudgeConfig) -> None:
        self.signal = config.name
        self.engine = load_engine(config.model)

    def plan(self, groups: list[PromptGroup]) -> Plan:
        jobs, index = [], []
        for k, group in enumerate(groups):
            live = [i for i, text in enumerate(group.responses) if text.strip()]
            for i, j in itertools.combinations(live, 2):
                jobs.append((group.prompt[columns.MESSAGES], group.responses[i], group.responses[j]))
                index.append((k, i, j))

        def finish(results: list[list[ReadResult]]) -> list[list[Score]]:
            [read] = results
            per_prompt: dict[int, dict[tuple[int, int], Verdict | Failed]] = {}
            for (k, i, j), verdict in zip(index, pair_verdicts(read), strict=True):
                per_prompt.setdefault(k, {})[(i, j)] = verdict
            return [self._prompt_scores(g.responses, per_prompt.get(k, {})) for k, g in enumerate(groups)]

        return Plan([(self.engine, pair_requests(jobs))], finish)

    def _prompt_scores(
        self, responses: list[str], verdicts: dict[tuple[int, int], Verdict | Failed]
    ) -> list[Score]:
        failed = [v for v in verdicts.values() if isinstance(v, Failed)]
        ok = {pair: v for pair, v in verdicts.items() if isinstance(v, Verdict)}
        if failed or not ok:
            reason = failed[0].reason if failed else reasons.FEWER_THAN_TWO_REPLIES
            return [Score(None, reasons.EMPTY_RESPONSE if not t.strip() else reason) for t in responses]
        live = sorted({i for pair in ok for i in pair})
        position = {i: n for n, i in enumerate(live)}
        strengths = bradley_terry(
            len(live), {(position[i], position[j]): v.p_first for (i, j), v in ok.items()}
        )
        agree = fmean(1.0 if v.swap_agree else 0.0 for v in ok.values())
        scores = []
        for i in range(len(responses)):
            if i not in position:
                scores.append(Score(None, reasons.EMPTY_RESPONSE))
                continue
            # Keyed by the opponent, whichever side of the pair this reply was on.
            wins = {
                f"{b if a == i else a}": round(v.p_first if a == i else 1 - v.p_first, 6)
                for (a, b), v in ok.items()
                if i in (a, b)
            }
            scores.append(Score(strengths[position[i]], details={"swap_agreement": agree, "p_beats": wins}))
        return scores
