"""The baseline of ``bench.vllm``: plain ``vllm.LLM.generate`` in vLLM's own environment, no prefsmith.

Run by ``bench.vllm`` with ``.venv-vllm``'s Python. It loads the model with the options it is given,
then answers one line on stdin ("run") with one timed ``LLM.generate`` over the same token ids,
seeds and sampling parameters the engine sends, and prints the result as one ``RESULT {json}``
line (vLLM's own logging shares stdout). Kept free of prefsmith imports: it is what a user would
write with vLLM alone.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], **spec["options"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompt_ids"]]
    params = [
        SamplingParams(
            n=spec["n"],
            temperature=spec["temperature"],
            top_p=spec["top_p"],
            max_tokens=spec["max_tokens"],
            seed=seed,
        )
        for seed in spec["seeds"]
    ]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, seed=0), use_tqdm=False)  # warm-up
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - started
        texts = [o.text for out in outputs for o in sorted(out.outputs, key=lambda o: o.index)]
        tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
        print("RESULT " + json.dumps({"seconds": seconds, "tokens": tokens, "texts": texts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
