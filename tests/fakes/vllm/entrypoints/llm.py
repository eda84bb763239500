"""``vllm.LLM`` on CPU: the real class's parameters, a transformers model doing the arithmetic.

Behaviour mirrored from vLLM (V1 engine), because the engine under test relies on it:

* ``generate`` takes one prompt or a list (strings or ``TokensPrompt``) and one
  ``SamplingParams`` or a list of the same length; with none it uses the
  defaults (so ``max_tokens`` is 16);
* a prompt longer than ``max_model_len`` makes the whole call raise;
* ``n`` samples of a seeded request use seeds ``seed + index``;
* generated ``token_ids`` keep the stop token, ``text`` does not; ``stop_reason``
  is None for the tokenizer's EOS and the token id for other stop tokens;
* ``prompt_logprobs`` is a list with None first, then per position a dict
  token id -> ``Logprob`` holding the actual token first and the top k;
* ``runner="auto"`` picks the pooling runner for a ``*ForSequenceClassification``
  architecture and the generate runner otherwise; each runner refuses the other's
  methods; ``classify`` pools the last token of each prompt through the head and
  applies the default activation (sigmoid for one output, softmax for several)
  unless ``PoolingParams(use_activation=False)``.

Settings the fake does not implement (penalties, stop strings, min_tokens,
sample logprobs ...) are refused unless neutral, so a test cannot pass because a
setting was silently ignored.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    CompletionOutput,
    RequestOutput,
)
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams

# EngineArgs fields the fake accepts through **kwargs (all exist in vLLM's EngineArgs).
_ENGINE_KWARGS = {"max_model_len", "kv_cache_memory_bytes"}
_NEUTRAL = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "stop": None,
    "ignore_eos": False,
    "min_tokens": 0,
    "logprobs": None,
    "include_stop_str_in_output": False,
}


class LLM:
    def __init__(
        self,
        model: str,
        *,
        runner: str = "auto",
        convert: str = "auto",
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.92,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
            GenerationConfig,
        )

        unknown = sorted(set(kwargs) - _ENGINE_KWARGS)
        if unknown:
            raise TypeError(f"the fake LLM does not implement engine arguments {unknown}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if convert != "auto":
            raise NotImplementedError("the fake LLM does not convert models between runners")
        architectures = AutoConfig.from_pretrained(model).architectures or []
        classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
        chosen_runner = runner
        if runner == "auto":
            runner = "pooling" if classifier else "generate"
        if runner == "pooling" and not classifier:
            raise NotImplementedError("the fake LLM pools only *ForSequenceClassification models")
        self.init_args = {
            "model": model,
            "tokenizer": tokenizer,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            **kwargs,
        }
        if chosen_runner != "auto":
            self.init_args["runner"] = chosen_runner  # recorded only when the caller chose one
        torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
        self._tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or model, trust_remote_code=trust_remote_code
        )
        auto = AutoModelForSequenceClassification if runner == "pooling" else AutoModelForCausalLM
        self._model = auto.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).eval()
        derived = int(self._model.config.max_position_embeddings)
        max_model_len = kwargs.get("max_model_len")
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                f"max_model_len (max_position_embeddings={derived})"
            )
        try:
            generation = GenerationConfig.from_pretrained(model)
            extra_eos = generation.eos_token_id
        except OSError:
            extra_eos = None
        extra = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        self._eos = self._tokenizer.eos_token_id
        self._stop_ids = {t for t in extra if isinstance(t, int) and t != self._eos}
        self._rng = random.Random(seed)
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(max_model_len=max_model_len or derived, runner_type=runner),
            get_tokenizer=lambda: self._tokenizer,
        )
        self.calls: list[tuple[list[Any], list[SamplingParams]]] = []
        self._requests = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    # ------------------------------------------------------------ public API

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if lora_request is not None or priority is not None or mm_processor_kwargs is not None:
            raise NotImplementedError("the fake LLM does not implement LoRA, priorities or multimodal")
        if self.llm_engine.model_config.runner_type != "generate":
            raise ValueError(
                "LLM.generate() is only supported for generative models. "
                "Try passing `--runner generate` to use the model as a generative model."
            )
        items = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(items)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(items)
        else:
            params = list(sampling_params)
            if len(params) != len(items):
                raise ValueError("The lengths of prompts and sampling_params must be the same.")
        ids = self._checked_ids(items, tokenization_kwargs)
        for p in params:
            for name, neutral in _NEUTRAL.items():
                if getattr(p, name) != neutral:
                    raise NotImplementedError(f"the fake LLM does not implement SamplingParams.{name}")
        self.calls.append((items, params))
        return [self._run(prompt_ids, p) for prompt_ids, p in zip(ids, params, strict=True)]

    def classify(
        self,
        prompts: Any,
        *,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """The head's outputs at each prompt's last token, one ``ClassificationRequestOutput`` per prompt."""
        if lora_request is not None:
            raise NotImplementedError("the fake LLM does not implement LoRA")
        if self.llm_engine.model_config.runner_type != "pooling":
            raise ValueError(
                "LLM.encode() is only supported for pooling models. "
                "Try passing `--runner pooling` to use the model as a pooling model."
            )
        items = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * len(items)
        else:
            params = list(pooling_params)
            if len(params) != len(items):
                raise ValueError("The lengths of prompts and pooling_params must be the same.")
        ids = self._checked_ids(items, tokenization_kwargs)
        self.calls.append((items, params))
        out = []
        for prompt_ids, p in zip(ids, params, strict=True):
            request_id = str(self._requests)
            self._requests += 1
            probs = ClassificationOutput(self._classify(prompt_ids, p.use_activation))
            out.append(ClassificationRequestOutput(request_id, probs, prompt_ids, 0, True))
        return out

    def chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: Any = None,
        priority: Any = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's template, then ``generate`` the token ids."""
        if tools is not None or chat_template_content_format != "auto":
            raise NotImplementedError("the fake LLM.chat does not implement tools or content formats")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            ids = self._tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
                **(chat_template_kwargs or {}),
            )
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
            prompts.append(TokensPrompt(prompt_token_ids=list(ids)))
        return self.generate(
            prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request, priority=priority
        )

    # ------------------------------------------------------------ the arithmetic

    def _prompt_ids(self, item: Any, tokenization_kwargs: dict[str, Any] | None) -> list[int]:
        if isinstance(item, str):
            return list(self._tokenizer(item, **(tokenization_kwargs or {}))["input_ids"])
        if isinstance(item, dict) and "prompt_token_ids" in item:
            return [int(t) for t in item["prompt_token_ids"]]
        raise TypeError(f"the fake LLM takes strings or TokensPrompt dicts, got {type(item).__name__}")

    def _checked_ids(self, items: list[Any], tokenization_kwargs: dict[str, Any] | None) -> list[list[int]]:
        """Token ids of every prompt, validated before anything runs: one bad prompt fails the call."""
        ids = [self._prompt_ids(item, tokenization_kwargs) for item in items]
        limit = self.llm_engine.model_config.max_model_len
        for prompt_ids in ids:
            if len(prompt_ids) > limit:
                raise ValueError(
                    f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model "
                    f"length of {limit}. Make sure that `max_model_len` is no smaller than the number "
                    "of text tokens."
                )
        return ids

    def _classify(self, ids: list[int], use_activation: bool | None) -> list[float]:
        """LAST pooling as vLLM's sequence-classification adapter does it: the head on the final token.

        The activation follows vLLM's default for a classifier without a ``problem_type``.
        """
        import torch

        if getattr(self._model.config, "problem_type", None) is not None:
            raise NotImplementedError("the fake LLM does not implement problem_type activations")
        base = getattr(self._model, self._model.base_model_prefix)
        with torch.inference_mode():
            hidden = base(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            logits = self._model.score(hidden).float()
            if use_activation is None or use_activation:
                logits = torch.sigmoid(logits) if logits.shape[-1] < 2 else torch.softmax(logits, dim=-1)
        return [float(v) for v in logits.tolist()]

    def _logprobs(self, ids: list[int]) -> Any:
        """log_softmax over the vocabulary at every position of ``ids`` (float64)."""
        import torch

        with torch.inference_mode():
            logits = self._model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, dim=-1)

    def _prompt_logprobs(self, ids: list[int], k: int, detokenize: bool) -> list[dict[int, Logprob] | None]:
        table = self._logprobs(ids)
        out: list[dict[int, Logprob] | None] = [None]
        for pos in range(1, len(ids)):
            row = table[pos - 1]
            actual = ids[pos]
            wanted = [actual]
            top = row.topk(row.shape[0] if k == -1 else k).indices.tolist() if k != 0 else []
            wanted += [t for t in top if t != actual]
            entry = {}
            for token in wanted:
                rank = int((row > row[token]).sum()) + 1
                text = self._tokenizer.decode([token]) if detokenize else None
                entry[token] = Logprob(float(row[token]), rank, text)
            out.append(entry)
        return out

    def _sample(self, ids: list[int], p: SamplingParams, seed: int) -> CompletionOutput:
        import torch

        generator = torch.Generator().manual_seed(seed)
        limit = self.llm_engine.model_config.max_model_len
        budget = p.max_tokens if p.max_tokens is not None else limit - len(ids)
        stop_ids = self._stop_ids | set(p.stop_token_ids or ())
        out: list[int] = []
        finish, stop_reason = "length", None
        while len(out) < budget and len(ids) + len(out) < limit:
            row = self._logprobs(ids + out)[-1]
            if p.temperature == 0.0:
                token = int(row.argmax())
            else:
                probs = torch.softmax(row / p.temperature, dim=-1)
                order = probs.argsort(descending=True)
                keep = torch.zeros_like(probs, dtype=torch.bool)
                cumulative = probs[order].cumsum(0)
                kept = order[(cumulative - probs[order]) < p.top_p]  # smallest set reaching top_p
                if p.top_k > 0:
                    kept = kept[: p.top_k]
                keep[kept] = True
                if p.min_p > 0.0:
                    keep &= probs >= p.min_p * probs.max()
                probs = torch.where(keep, probs, torch.zeros_like(probs))
                token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            out.append(token)
            if token == self._eos:
                finish = "stop"
                break
            if token in stop_ids:
                finish, stop_reason = "stop", token
                break
        shown = out[:-1] if finish == "stop" else out
        text = (
            self._tokenizer.decode(shown, skip_special_tokens=p.skip_special_tokens) if p.detokenize else ""
        )
        return CompletionOutput(0, text, out, None, None, finish, stop_reason)

    def _run(self, ids: list[int], p: SamplingParams) -> RequestOutput:
        request_id = str(self._requests)
        self._requests += 1
        prompt_logprobs = (
            self._prompt_logprobs(ids, p.prompt_logprobs, p.detokenize)
            if p.prompt_logprobs is not None
            else None
        )
        outputs = []
        for index in range(p.n):
            seed = p.seed + index if p.seed is not None else self._rng.getrandbits(31)
            sample = self._sample(ids, p, seed)
            sample.index = index
            outputs.append(sample)
        return RequestOutput(request_id, None, ids, prompt_logprobs, outputs, True)
