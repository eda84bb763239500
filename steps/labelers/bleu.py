"""BLEU against the prompt's reference answers as a labeler (the metric: ``steps.labelers.bleu_score``)."""

from __future__ import annotations

from schemas import columns, reasons
from schemas.recipe import BleuConfig
from steps.labelers.base import Labeler, PromptGroup, Score
from steps.labelers.bleu_score import BleuScorer


class BleuLabeler(Labeler):
    """BLEU of each response against the prompt's references (docs/design.md, BLEU against references)."""

    def __init__(self, config: BleuConfig) -> None:
        self.signal = config.name
        self.variant = config.variant

    def score_prompt(self, group: PromptGroup) -> list[Score]:
        references = group.prompt[columns.REFERENCES] or []
        if not references:
            return [Score(None, reasons.NO_REFERENCES)] * len(group.responses)
        scorer = BleuScorer(references, variant=self.variant)
        return [Score(scorer.score(text)) for text in group.responses]
