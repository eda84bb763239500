"""A trained reward model as a labeler: one forward pass per (conversation, response), no generation.

The score is the model's head output (``head: i`` picks one output of a multi-objective head).
Rewards are on the model's own scale; aggregation z-scores every signal within a prompt, so the
scale does not matter there (docs/design.md, Reward model).
"""

from __future__ import annotations

from schemas import columns, reasons
from schemas.recipe import RewardModelConfig
from steps.engines import Failed, RewardRequest, load_reward_model
from steps.engines.reward import head_index
from steps.labelers.base import Labeler, PromptGroup, Score, regroup


class RewardModelLabeler(Labeler):
    def __init__(self, config: RewardModelConfig) -> None:
        self.signal = config.name
        self.scorer = load_reward_model(config.model)
        # Checked again here: a hub id that was not downloaded at preflight is only checked now.
        self.head = head_index(self.scorer.labels, config.head, self.scorer.model_id)

    def score_prompts(self, groups: list[PromptGroup]) -> list[list[Score]]:
        requests, owners = [], []
        for group in groups:
            for text in group.responses:
                # Nothing to judge, and every model labeler nulls it, so no signal alone decides blanks.
                owners.append(len(requests) if text.strip() else None)
                if text.strip():
                    requests.append(RewardRequest(group.prompt[columns.MESSAGES], text))
        results = self.scorer.reward(requests)
        flat = [Score(None, reasons.EMPTY_RESPONSE) if k is None else self._score(results[k]) for k in owners]
        return regroup(groups, flat)

    def _score(self, outputs: tuple[float, ...] | Failed) -> Score:
        if isinstance(outputs, Failed):
            return Score(None, outputs.reason)
        if len(outputs) == 1:
            return Score(outputs[0])
        heads = dict(zip(self.scorer.labels, outputs, strict=True))
        return Score(outputs[self.head], details={"heads": heads})
