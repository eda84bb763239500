"""The typed recipe: everything a run depends on, validated before any model loads.

A recipe is YAML read with ``yaml.safe_load`` into these pydantic models. Unknown
keys, wrong types and values that cannot produce a preference dataset are
rejected with a message that names the key path, so a typo costs a second,
not a model load. One module per top-level key; this one holds the whole recipe
and its loader, and is where every other module imports recipe types from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from schemas.recipe.base import EVAL_DIR, PIPELINES_DIR, RecipeError, Strict, format_errors
from schemas.recipe.eval import EvalConfig, EvalPairs
from schemas.recipe.labelers import (
    LABELER_NAME,
    NOT_SHAPING,
    OFF_CARD_SETTINGS,
    RESERVED_NAMES,
    BleuConfig,
    ContrastSide,
    DensityRatioConfig,
    FollowUpConfig,
    LabelerConfig,
    PairwiseJudgeConfig,
    PointwiseJudgeConfig,
    RewardModelConfig,
)
from schemas.recipe.models import VLLM_ONLY, DecodeMode, ModelConfig, PolicyConfig, ScorerModelConfig
from schemas.recipe.output import CardConfig, OutputConfig
from schemas.recipe.pairing import ConsistencyConfig, PairingConfig
from schemas.recipe.prompts import (
    BuiltinPrompts,
    DecontaminationConfig,
    EvalPromptSet,
    FilePrompts,
    HFPrompts,
    NearDuplicatesConfig,
    PromptsConfig,
)
from schemas.recipe.sampling import SamplingConfig


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    prompts: PromptsConfig = BuiltinPrompts()
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    policy: PolicyConfig = PolicyConfig()
    sampling: SamplingConfig = SamplingConfig()
    labelers: list[LabelerConfig] = Field(default_factory=lambda: [BleuConfig()], min_length=1)
    pairing: PairingConfig = PairingConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    output: OutputConfig = OutputConfig()
    card: CardConfig = CardConfig()
    eval: EvalConfig | None = Field(None, description="human-labelled pairs every run is measured on")

    @model_validator(mode="after")
    def _unique_labeler_names(self) -> Recipe:
        names = [labeler.name for labeler in self.labelers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"labelers: names must be unique, repeated: {dupes}")
        for name in names:
            # A name becomes columns (score_<name>_chosen) and sits beside the response
            # columns while pairing, so it must be a plain identifier that no column uses.
            if not LABELER_NAME.fullmatch(name):
                raise ValueError(
                    f"labelers: name {name!r} must start with a letter and use only letters, "
                    "digits and _ (at most 48 characters); it becomes a column name"
                )
            if name in RESERVED_NAMES:
                raise ValueError(f"labelers: name {name!r} is already a column of responses; pick another")
        if not self.voting_signals:
            raise ValueError("labelers: every weight is 0, so nothing would choose between responses")
        rules = self.consistency
        voting = len(self.voting_signals)
        if rules.min_agree is not None and rules.min_agree > voting:
            raise ValueError(
                f"consistency.min_agree: {rules.min_agree} > the {voting} signal(s) with a non-zero weight"
            )
        if rules.require_swap_agreement and self.pairing.judge is None:
            raise ValueError("consistency.require_swap_agreement needs pairing.judge (the verdict per pair)")
        unknown = [s for s in (rules.rank_signals or ()) if s not in names]
        if unknown:
            raise ValueError(f"consistency.rank_signals: unknown signal(s) {unknown}; labelers are {names}")
        return self

    @property
    def signals(self) -> list[str]:
        return [labeler.name for labeler in self.labelers]

    @property
    def voting_signals(self) -> list[str]:
        """The signals that count in the aggregate and in ``agreement`` (weight not 0)."""
        return [labeler.name for labeler in self.labelers if labeler.weight != 0]

    def output_uri(self) -> str:
        return self.output.uri or str(Path("outputs") / self.name)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the data (not where it is written)."""
        data = self.model_dump(mode="json")
        data["output"].pop("uri", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, **updates: Any) -> Recipe:
        """Apply CLI overrides (dotted keys like ``sampling.seed``) and revalidate."""
        data = self.model_dump(mode="python")
        for dotted, value in updates.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return _validate(data, where=f"recipe {self.name!r} with overrides")


def _validate(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where} is invalid:\n{format_errors(exc)}") from None


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe is a YAML path or the name of one shipped in ``pipelines/``."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist")
        return path
    shipped = PIPELINES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe named {name_or_path!r}; shipped recipes: {known}, or pass a path")


def load_recipe(name_or_path: str = "default") -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: nested too deeply to read") from None
    except ValueError as exc:  # a value YAML parses but Python refuses: 2024-02-30, a 5,000-digit integer
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: a value cannot be read ({exc})") from None
    return _validate(data, where=f"recipe {str(path)!r}")


# One import path for every recipe type, whichever section module defines it.
__all__ = [
    "EVAL_DIR",
    "NOT_SHAPING",
    "OFF_CARD_SETTINGS",
    "PIPELINES_DIR",
    "VLLM_ONLY",
    "BleuConfig",
    "BuiltinPrompts",
    "CardConfig",
    "ConsistencyConfig",
    "ContrastSide",
    "DecodeMode",
    "DecontaminationConfig",
    "DensityRatioConfig",
    "EvalConfig",
    "EvalPairs",
    "EvalPromptSet",
    "FilePrompts",
    "FollowUpConfig",
    "HFPrompts",
    "LabelerConfig",
    "ModelConfig",
    "NearDuplicatesConfig",
    "OutputConfig",
    "PairingConfig",
    "PairwiseJudgeConfig",
    "PointwiseJudgeConfig",
    "PolicyConfig",
    "PromptsConfig",
    "Recipe",
    "RecipeError",
    "RewardModelConfig",
    "SamplingConfig",
    "ScorerModelConfig",
    "load_recipe",
    "resolve_recipe_path",
]
