"""What the data card says about each labeler: its settings that shape the labels, nothing else."""

from __future__ import annotations

from typing import Any

from schemas.recipe import OFF_CARD_SETTINGS, VLLM_ONLY, FollowUpConfig, LabelerConfig, PointwiseJudgeConfig

# From the settings' own metadata (schemas.recipe): n_ctx stays, since a scorer fails responses past
# it as too_long; vLLM-only settings are left out for other engines, where they would mislead.
# A pointwise judge in expected mode reads score probabilities; it samples nothing.
_SAMPLED_JUDGE_ONLY = {"n", "temperature", "max_tokens"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    skip = set(OFF_CARD_SETTINGS)
    if "engine" in data:  # a model's settings: show the window option its engine reads
        skip |= VLLM_ONLY if data["engine"] != "vllm" else {"n_ctx"}
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def labeler_settings(config: LabelerConfig) -> dict[str, Any]:
    """What the card says about a labeler (flat ``key=value`` pairs), without loading its model."""
    exclude = {"name"}
    if isinstance(config, PointwiseJudgeConfig) and config.mode == "expected":
        exclude |= _SAMPLED_JUDGE_ONLY
    data = _flatten(config.model_dump(mode="json", exclude=exclude))
    if isinstance(config, FollowUpConfig):
        from steps.labelers.follow_up import load_followups

        sets = load_followups(config)
        data["followups_used"] = sum(len(d.positive) + len(d.negative) for d in sets.values())
    return data
