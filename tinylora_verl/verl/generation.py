"""Offline generation with vLLM for the evaluation: a vLLM engine as the evaluation's ``generate`` callable.

The evaluation (:mod:`tinylora_verl.apps.eval`) grades whatever a ``generate(messages_list, decoding)`` callable
returns; this is the real one. It lives in the integration package because it imports vLLM. Modes: a base or merged
HF folder as is, or the exact rank-r LoRA served by vLLM's LoRA support (``max_lora_rank`` is the smallest value
vLLM allows that is >= r; a rank-2 LoRA loads into rank-8 slots without padding).
"""

from __future__ import annotations

import gc
import os

# vllm.config.lora.MaxLoRARanks in 0.31; read from vLLM when importable.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_for(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a rank-``r`` LoRA (vLLM only allows a fixed set)."""
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks

        allowed = tuple(typing.get_args(MaxLoRARanks)) or _VLLM_LORA_RANKS
    except ImportError:
        allowed = _VLLM_LORA_RANKS
    fits = [a for a in sorted(allowed) if a >= r]
    if not fits:
        raise ValueError(f"LoRA rank {r} exceeds vLLM's largest max_lora_rank; allowed values are {list(allowed)}")
    return fits[0]


def serving_dtype() -> str:
    """bf16 on a GPU; on a CPU, bf16 only where it has native bf16 matrix instructions (as the CPU overlay decides)."""
    import torch

    from .cpu.precision import cpu_dtype

    return "bfloat16" if torch.cuda.is_available() else cpu_dtype()


class VLLMBackend:
    """A vLLM engine as a :data:`GenerateFn`; ``lora_dir`` serves every request through that LoRA.

    Runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor) for a 4 s start on CPU, and seeds the
    engine rather than requests: vLLM CPU dies on per-request seeds. Call :meth:`close` before starting another.
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 (about 46k SmolLM2 tokens); raise it when prompts x samples x
    (prompt + max_tokens) exceed that, or the engine preempts and recomputes sequences and crawls.
    """

    def __init__(self, model_dir: str, lora_dir: str | None = None, lora_rank: int = 2, max_model_len: int = 2048,
                 seed: int = 0, dtype: str = "auto", **engine_kwargs):
        if dtype == "auto":
            dtype = serving_dtype()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM  # 7-14 s import: only here

        kwargs = dict(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
                      distributed_executor_backend="uni", **engine_kwargs)
        self.lora_request = None
        if lora_dir is not None:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_for(lora_rank), max_loras=1)
            self.lora_request = LoRARequest("tinylora", 1, str(lora_dir))
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:
            if lora_dir is None:
                raise
            raise RuntimeError(f"this vLLM build could not start with LoRA support (enable_lora=True, "
                               f"max_lora_rank={kwargs['max_lora_rank']}): {type(e).__name__}: {e}; "
                               f"use --mode merged") from e
        self.tokenizer = self.llm.get_tokenizer()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """``messages`` rendered with the chat template (generation prompt added) and tokenized once."""
        # Rendered and tokenized once here so that no backend adds a second BOS to a template that has one.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, messages_list: list[list[dict]], decoding) -> list[list[tuple[str, int]]]:
        from vllm import SamplingParams

        sp = SamplingParams(n=decoding.n, temperature=decoding.temperature, top_p=decoding.top_p,
                            max_tokens=decoding.max_tokens)
        prompts = [{"prompt_token_ids": self.prompt_ids(m)} for m in messages_list]
        outs = self.llm.generate(prompts, sp, lora_request=self.lora_request, use_tqdm=True)
        return [[(c.text, len(c.token_ids)) for c in o.outputs] for o in outs]

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-prob of each token of ``token_ids`` after its prefix (the first token has none and is left out)."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": list(token_ids)}], sp, lora_request=self.lora_request,
                                use_tqdm=False)[0]
        return [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()


__all__ = ["VLLMBackend", "lora_rank_for", "serving_dtype"]
