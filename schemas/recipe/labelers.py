"""``labelers:`` the signals, one entry per labeler, told apart by ``kind``."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from schemas.recipe.base import AGGREGATE_ONLY, OFF_CARD, SPEED_ONLY, Strict, Weight, tagged
from schemas.recipe.models import ModelConfig, ScorerModelConfig
from schemas.records import LABELS, PROMPTS, RESPONSES

LABELER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")


RESERVED_NAMES = frozenset(PROMPTS.names) | frozenset(RESPONSES.names) | frozenset(LABELS.names)


DEFAULT_CRITERIA = (
    "You are a careful, expert assistant. Answer the user's request directly and correctly, "
    "stay on topic, give concrete and accurate details, follow every instruction in the request, "
    "and keep the answer clear and well organised."
)


class Exemplar(Strict):
    """One worked example shown before the real prompt (customised CDR)."""

    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)


class ContrastSide(Strict):
    """One side of a density ratio: a model plus what it is told before the prompt."""

    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    system_prompt: str | None = None
    exemplar: Exemplar | None = None


class DensityRatioConfig(Strict):
    """log p_strong(y|x) - log p_weak(y|x) over response tokens (CDR; docs/design.md, Density ratio)."""

    kind: Literal["density_ratio"]
    name: str = "density_ratio"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    strong: ContrastSide = ContrastSide(system_prompt=DEFAULT_CRITERIA)
    weak: ContrastSide = ContrastSide()
    reduce: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _sides_differ(self) -> DensityRatioConfig:
        if self.strong == self.weak:
            raise ValueError("strong and weak are identical, so every ratio would be 0")
        return self


class FollowUpConfig(Strict):
    """Likelihood of positive minus negative follow-up user turns (docs/design.md, Follow-up likelihood)."""

    kind: Literal["follow_up"]
    name: str = "follow_up"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    followups: str = Field("default", description="a set in pipelines/followups/ or a YAML path")
    dimensions: list[str] | None = Field(None, description="only these dimensions (default: all)")
    per_dimension: int | None = Field(None, ge=1, description="first k positive and k negative per dimension")


class PointwiseJudgeConfig(Strict):
    """An additive 0-5 rubric judged by a model (Self-Rewarding LMs)."""

    kind: Literal["judge_pointwise"]
    name: str = "judge"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    mode: Literal["expected", "sampled"] = "expected"
    n: int = Field(3, ge=1, description="judgements sampled per response (mode: sampled)")
    temperature: float = Field(0.7, gt=0.0)
    max_tokens: int = Field(256, ge=8)


class PairwiseJudgeConfig(Strict):
    """Round-robin pairwise verdicts (both orders) fitted to per-response Bradley-Terry scores."""

    kind: Literal["judge_pairwise"]
    name: str = "pairwise"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)


class RewardModelConfig(Strict):
    """A sequence-classification model's reward for (conversation, response) (docs/design.md, Reward model).

    There is no default model: no reward model ships with prefsmith, and a causal LM
    quietly standing in for one would score nothing meaningful.
    """

    kind: Literal["reward_model"]
    name: str = "reward"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(
        description="a *ForSequenceClassification checkpoint: a Hugging Face directory or hub id"
    )
    head: int | None = Field(
        None, ge=0, description="which output of a multi-objective head (default: the model's only one)"
    )

    @model_validator(mode="before")
    @classmethod
    def _model_is_named(cls, data: Any) -> Any:
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(data, dict) and (model is None or (isinstance(model, dict) and "model" not in model)):
            raise ValueError(
                "model.model: name the reward model (a Hugging Face directory or hub id of a "
                "*ForSequenceClassification checkpoint); there is no default"
            )
        return data

    @model_validator(mode="after")
    def _engine_has_heads(self) -> RewardModelConfig:
        if self.model.engine == "llama_cpp":
            raise ValueError(
                "model.engine: llama_cpp has no classifier heads; "
                "use engine: transformers (CPU or CUDA) or vllm"
            )
        return self


class BleuConfig(Strict):
    """Smoothed sentence BLEU-4 against the prompt's references (docs/design.md, BLEU against references)."""

    kind: Literal["bleu"] = "bleu"
    name: str = "bleu"
    variant: Literal["bleuberi", "sacrebleu"] = "bleuberi"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)


LabelerConfig = Annotated[
    BleuConfig
    | DensityRatioConfig
    | FollowUpConfig
    | PointwiseJudgeConfig
    | PairwiseJudgeConfig
    | RewardModelConfig,
    Field(discriminator="kind"),
]


LABELER_CONFIGS = (
    BleuConfig,
    DensityRatioConfig,
    FollowUpConfig,
    PointwiseJudgeConfig,
    PairwiseJudgeConfig,
    RewardModelConfig,
)


# Left out of the resume keys of every stage: changing them must not invalidate finished shards.
NOT_SHAPING = tagged(ModelConfig, **SPEED_ONLY).union(
    *(tagged(config, **AGGREGATE_ONLY) for config in LABELER_CONFIGS)
)


# Left out of what the card says about a model.
OFF_CARD_SETTINGS = tagged(ModelConfig, **SPEED_ONLY) | tagged(ModelConfig, **OFF_CARD)
