"""Checks of a recipe's labelers before any model loads: every model resolves, every follow-up set reads,
every reward model is a classifier with the head the recipe names."""

from __future__ import annotations

import yaml

from schemas.recipe import (
    DensityRatioConfig,
    FollowUpConfig,
    ModelConfig,
    PairwiseJudgeConfig,
    PointwiseJudgeConfig,
    Recipe,
    RecipeError,
    RewardModelConfig,
)


def preflight(recipe: Recipe) -> None:
    """Everything the run needs that can be checked without loading a model; errors name the recipe key.

    Covers every model of the recipe (policy, labelers, pair judge) and the
    follow-up sets, so a typo in the fourth labeler fails in milliseconds, not
    after the policy has sampled every prompt.
    """
    from steps.engines import ModelSpecError, resolve_model
    from steps.engines.reward import head_index, local_labels
    from steps.labelers.follow_up import load_followups

    check_gpu_shares(recipe)
    for key, model in recipe_models(recipe):
        try:
            resolve_model(model.model, model.engine)
        except ModelSpecError as exc:
            raise ModelSpecError(f"{key}: {exc}") from None
    for i, config in enumerate(recipe.labelers):
        if isinstance(config, RewardModelConfig):
            # Reads config.json only (no weights); a hub id not downloaded yet is checked when it loads.
            model = config.model
            try:
                labels = local_labels(resolve_model(model.model, model.engine), model.trust_remote_code)
                if labels is not None:
                    head_index(labels, config.head, model.model)
            except ModelSpecError as exc:
                raise ModelSpecError(f"labelers.{i}.model.model ({config.name}): {exc}") from None
        if isinstance(config, FollowUpConfig):
            try:
                load_followups(config)
            except yaml.YAMLError as exc:
                raise RecipeError(
                    f"labelers.{i}.followups: {config.followups!r} is not valid YAML "
                    f"(only plain YAML is read, no Python tags): {exc}"
                ) from None


def recipe_models(recipe: Recipe) -> list[tuple[str, ModelConfig]]:
    """Every model the recipe would load, with the key path that names it."""
    found = [("policy.model", recipe.policy)]
    for i, config in enumerate(recipe.labelers):
        if isinstance(config, DensityRatioConfig):
            found += [
                (f"labelers.{i}.strong.model.model ({config.name})", config.strong.model),
                (f"labelers.{i}.weak.model.model ({config.name})", config.weak.model),
            ]
        elif isinstance(
            config, FollowUpConfig | PointwiseJudgeConfig | PairwiseJudgeConfig | RewardModelConfig
        ):
            found.append((f"labelers.{i}.model.model ({config.name})", config.model))
    if recipe.pairing.judge is not None:
        found.append(("pairing.judge.model.model", recipe.pairing.judge.model))
    return found


def check_gpu_shares(recipe: Recipe, policy_resident: bool = False) -> None:
    """vLLM models that one process holds together must not claim more than a whole GPU between them.

    Each vLLM engine reserves ``gpu_memory_utilization`` of every GPU it spans. The labeling stage
    loads all its labelers' models in one process (per GPU group on a pool), and the pair judge
    loads where the labelers' engines are still cached, so their shares add up; the second engine
    would otherwise fail for want of memory after the first had loaded, minutes into the run.
    ``policy_resident``: sampling ran in this same process (no model pool), and the policy's engine
    stays cached there, so its share counts too. Equal settings load once and count once, except
    that a reward model's classifier is a load of its own even where a judge reads the same
    checkpoint with equal settings. The sum is checked against the first GPU of a group, which
    every model of the stage spans, whatever its ``tensor_parallel_size``. A model given
    ``kv_cache_gib`` sizes its cache in bytes and vLLM ignores its share, so it is not counted.
    """
    from steps.engines import load_key

    # By key path, not object identity: one ModelConfig object may serve a judge and a reward model.
    classifiers = tuple(
        f"labelers.{i}." for i, config in enumerate(recipe.labelers) if isinstance(config, RewardModelConfig)
    )
    held: dict[tuple[object, ...], tuple[str, ModelConfig]] = {}
    for key, model in recipe_models(recipe):
        if (
            (policy_resident or key != "policy.model")
            and model.engine == "vllm"
            and model.kv_cache_gib is None
        ):
            held.setdefault(load_key(model, classifier=key.startswith(classifiers)), (key, model))
    total = sum(model.gpu_memory_utilization for _, model in held.values())
    if total > 1.0 + 1e-9:
        parts = ", ".join(f"{key}: {model.gpu_memory_utilization:g}" for key, model in held.values())
        if policy_resident and "policy.model" in {key for key, _ in held.values()}:
            raise RecipeError(
                f"the policy's and the labelers' vLLM models claim {total:.2f} of each GPU together "
                f"({parts}); without --model-deployment one process samples and then labels, and the "
                "policy's engine stays loaded while the labelers load. Run the model stages on a GPU "
                "pool (--model-deployment, README 'Run on a schedule and on GPU pools'), where each "
                "stage gets its own process, or lower gpu_memory_utilization until the sum is at most 1"
            )
        raise RecipeError(
            f"the labelers' vLLM models claim {total:.2f} of each GPU together ({parts}); one process "
            "loads them all, so lower their gpu_memory_utilization until the sum is at most 1 "
            "(about 0.9 leaves room for activations)"
        )
