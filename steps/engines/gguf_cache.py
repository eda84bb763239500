"""GGUF files as transformers checkpoints: dequantised once, then read from a cache.

Loading a GGUF through transformers dequantises it (15–20 s for the default model on 2 cores),
so the converted weights are saved once under the cache directory (``PREFSMITH_CACHE``, default
``~/.cache/prefsmith``) and later loads read the safetensors copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from steps.engines.llama_build import cache_root
from steps.engines.models import ResolvedModel


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def materialise(model: ResolvedModel) -> str:
    """A directory or hub id ``from_pretrained`` can read; GGUFs are converted once and cached."""
    if model.kind != "gguf":
        return model.location
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"{Path(model.location).stem}-{_gguf_cache_key(model.path)}"
    target = cache_root() / "converted" / name
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return str(target)
    folder, filename = str(model.path.parent), model.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype="float32")
    # The loaded weights are already dequantised, but transformers still flags the
    # model as GGUF-quantised and refuses to save it: copy them into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = AutoModelForCausalLM.from_config(config, dtype="float32")
    weights.load_state_dict(loaded.state_dict())
    weights.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    weights.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if target.exists():  # another process won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)
