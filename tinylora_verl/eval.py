"""Evaluate a base model and a TinyLoRA adapter on math benchmarks with vLLM; score, aggregate, write files.

Contract::

    evaluate(problems, backends={mode: generate}, decodings=[...], out_dir) -> list[summary rows]

``generate(messages_list, decoding) -> [[response, ...] per prompt]`` is any callable (a response is a string or
``(text, num_tokens)``); :class:`VLLMBackend` is the real one, tests inject a fake. Every response is graded with
:func:`tinylora_verl.rewards.compute_score`:

* GSM8K: ``acc`` = strict (last ``#### <n>``), ``acc_lenient`` = last number, ``formatted`` = has a ``#### <n>``;
* MATH-style: ``acc`` = last ``\\boxed{}`` equivalent per math-verify, ``formatted`` = has a non-empty ``\\boxed{}``;
* ``reward`` = the training reward with ``format_score`` 0.1 (1 exact, 0.1 well-formed but wrong, else 0).

One summary row per benchmark x mode x decoding: mean accuracy over all responses (greedy: pass@1; sampled: the
mean over K samples), pass@K, format rate, mean reward, the share of problems whose K samples are neither all
formatted nor all unformatted (``mixed_format``) and whose rewards are not all equal (``mixed_reward``: GRPO groups
with a non-zero advantage), mean response length, wall time. Files in ``out_dir``: ``samples.jsonl`` (one line per
response), ``summary.json`` (rows + run metadata, incl. bf16 merge fidelity) and ``summary.csv``.

Modes: ``base`` (no adapter), ``merged`` (``cast_bf16(W + ΔW)`` formed in float32 and written to a temporary HF
folder vLLM loads), ``lora`` (the exact rank-r LoRA ``B = UΣM, A = Vᵀ`` served by vLLM's LoRA support, which works
on vLLM CPU 0.31; ``max_lora_rank`` is the smallest value vLLM allows that is >= r, and a rank-2 LoRA loads into
rank-8 slots without padding). ``auto`` = merged, plus lora when the bf16 merge fidelity is below 0.99 (ΔW partly
rounded away by the cast). Without an adapter only ``base`` runs; ``with_base`` adds it beside the adapter modes.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, Union

from .benchmarks import Problem
from .rewards import compute_score

MODES = ("merged", "lora", "both", "auto")
FORMAT_SCORE = 0.1
AUTO_FIDELITY = 0.99
# vllm.config.lora.MaxLoRARanks in 0.31; read from vLLM when importable.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

Response = Union[str, tuple[str, int]]
GenerateFn = Callable[[list[list[dict]], "Decoding"], list[list[Response]]]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """``n`` responses per prompt at ``temperature`` (0 = greedy), at most ``max_tokens`` new tokens each."""

    name: str
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"decoding {self.name!r}: n={self.n!r} must be an int >= 1")
        if self.temperature < 0:
            raise ValueError(f"decoding {self.name!r}: temperature={self.temperature!r} must be >= 0")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"decoding {self.name!r}: n={self.n} greedy samples would all be identical; "
                             "use temperature > 0")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"decoding {self.name!r}: max_tokens={self.max_tokens!r} must be an int >= 1")


def default_decodings(samples: int, temperature: float, max_tokens: int) -> list[Decoding]:
    """Greedy pass@1, plus ``samples`` responses at ``temperature`` when ``samples > 0``."""
    out = [Decoding("greedy", 1, 0.0, max_tokens)]
    if samples:
        out.append(Decoding(f"t{temperature:g}_n{samples}", samples, temperature, max_tokens))
    return out


def score_response(problem: Problem, response: str) -> dict:
    """Grade one response (see the module docstring); the keys are the per-sample JSONL columns."""
    gsm8k = problem.benchmark == "gsm8k"
    method = "strict" if gsm8k else "boxed"
    main = compute_score(problem.data_source, response, problem.ground_truth, method=method,
                         format_score=FORMAT_SCORE, return_dict=True)
    row = {"pred": main["pred"] or None, "correct": main["acc"] == 1.0, "formatted": bool(main["pred"].strip()),
           "reward": main["score"], "pred_lenient": None, "correct_lenient": None}
    if gsm8k:
        lenient = compute_score(problem.data_source, response, problem.ground_truth, method="lenient",
                                return_dict=True)
        row.update(pred_lenient=lenient["pred"] or None, correct_lenient=lenient["acc"] == 1.0)
    return row


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(rows: list[dict]) -> dict:
    """Summary metrics of the per-sample rows of one benchmark x mode x decoding."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["index"], []).append(r)
    lenient = [r["correct_lenient"] for r in rows if r["correct_lenient"] is not None]
    tokens = [r["num_tokens"] for r in rows if r["num_tokens"] is not None]
    return {
        "problems": len(groups),
        "responses": len(rows),
        "acc": _mean([float(r["correct"]) for r in rows]),
        "acc_lenient": _mean([float(c) for c in lenient]),
        "pass_at_k": _mean([float(any(r["correct"] for r in g)) for g in groups.values()]),
        "format_rate": _mean([float(r["formatted"]) for r in rows]),
        "mean_reward": _mean([r["reward"] for r in rows]),
        "mixed_format": _mean([float(len({r["formatted"] for r in g}) > 1) for g in groups.values()]),
        "mixed_reward": _mean([float(len({r["reward"] for r in g}) > 1) for g in groups.values()]),
        "mean_response_tokens": _mean(tokens),
        "mean_response_chars": _mean([len(r["response"]) for r in rows]),
    }


def evaluate(problems: Sequence[Problem], backends: dict[str, GenerateFn], decodings: Sequence[Decoding],
             out_dir: str | os.PathLike, meta: dict | None = None, progress: bool = True) -> list[dict]:
    """Generate, score and write ``samples.jsonl``/``summary.json``/``summary.csv``; returns the summary rows."""
    from tqdm import tqdm

    if not problems:
        raise ValueError("no problems to evaluate (check --limit/--offset and the benchmark sources)")
    if not backends:
        raise ValueError("no generation backends given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = list(dict.fromkeys(p.benchmark for p in problems))
    summary = []
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for mode, generate in backends.items():
            for dec in decodings:
                for bench in benchmarks:
                    items = [p for p in problems if p.benchmark == bench]
                    start = time.perf_counter()
                    outputs = generate([p.messages for p in items], dec)
                    seconds = time.perf_counter() - start
                    if len(outputs) != len(items) or any(len(o) != dec.n for o in outputs):
                        raise RuntimeError(f"backend {mode!r} returned {[len(o) for o in outputs][:8]}... responses "
                                           f"for {len(items)} prompts; expected {dec.n} for each")
                    rows = []
                    bar = tqdm(total=len(items) * dec.n, desc=f"score {bench}/{mode}/{dec.name}", disable=not progress)
                    for p, responses in zip(items, outputs):
                        for k, resp in enumerate(responses):
                            text, ntok = (resp, None) if isinstance(resp, str) else resp
                            rows.append({"benchmark": bench, "mode": mode, "decoding": dec.name, "index": p.index,
                                         "sample": k, "prompt": p.messages, "ground_truth": p.ground_truth,
                                         "response": text, "num_tokens": ntok, **score_response(p, text)})
                            bar.update()
                    bar.close()
                    for r in rows:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    tokens = sum(r["num_tokens"] or 0 for r in rows)
                    summary.append({"benchmark": bench, "mode": mode, "decoding": dec.name, "n": dec.n,
                                    "temperature": dec.temperature, "max_tokens": dec.max_tokens, **aggregate(rows),
                                    "seconds": round(seconds, 2),
                                    "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None})
    (out / "summary.json").write_text(json.dumps({"meta": meta or {}, "rows": summary}, indent=2))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return summary


# ---------------------------------------------------------------------------------------------- models


def resolve_modes(mode: str, has_adapter: bool, fidelity: float | None = None) -> list[str]:
    """The engine modes to run: ``base`` without an adapter, else per ``mode`` (``auto`` uses ``fidelity``)."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not supported; expected one of {MODES}")
    if not has_adapter:
        return ["base"]
    if mode == "both":
        return ["merged", "lora"]
    if mode == "auto":
        if fidelity is None:
            raise ValueError("--mode auto needs the merge fidelity of the adapter")
        return ["merged", "lora"] if fidelity < AUTO_FIDELITY else ["merged"]
    return [mode]


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


def write_merged_model(model_dir: str, adapter_path: str, out_dir: str, dtype: str = "bfloat16",
                       shard_bytes: int = 2 << 30, progress: bool = True) -> tuple[Path, float]:
    """Write base + adapter as an HF folder of ``cast(W + ΔW)`` weights; returns ``(folder, merge fidelity)``.

    The base is loaded in float32 and merged per tensor by ``adapter.merged_named_tensors`` (cast once), shards
    of at most ``shard_bytes`` keep peak memory at one float32 model plus one shard.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapter_io import load_adapter

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = load_adapter(adapter_path, model)
    fidelity, _ = adapter.merge_fidelity(torch_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Tied embeddings share storage; vLLM ties lm_head itself, so only the embedding is written.
    skip = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    shards, current, size = [], {}, 0
    state = model.state_dict()
    for name, tensor in tqdm(adapter.merged_named_tensors(state.items(), dtype=torch_dtype), total=len(state),
                             desc="merge", disable=not progress):
        if name in skip:
            continue
        current[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.dtype = torch_dtype
    model.config.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(out))
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():  # vLLM reads default sampling settings from it; keep them identical to the base's
        shutil.copy(gen_cfg, out / "generation_config.json")
    adapter.remove()
    return out, fidelity


class VLLMBackend:
    """A vLLM engine as a :data:`GenerateFn`; ``lora_dir`` serves every request through that LoRA.

    Runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor) for a 4 s start on CPU, and seeds the
    engine rather than requests: vLLM CPU dies on per-request seeds. Call :meth:`close` before starting another.
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 (about 46k SmolLM2 tokens); raise it when prompts x samples x
    (prompt + max_tokens) exceed that, or the engine preempts and recomputes sequences and crawls.
    """

    def __init__(self, model_dir: str, lora_dir: str | None = None, lora_rank: int = 2, max_model_len: int = 2048,
                 seed: int = 0, dtype: str = "bfloat16", **engine_kwargs):
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

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        # Rendered and tokenized once here so that no backend adds a second BOS to a template that has one.
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, messages_list: list[list[dict]], decoding: Decoding) -> list[list[tuple[str, int]]]:
        from vllm import SamplingParams

        sp = SamplingParams(n=decoding.n, temperature=decoding.temperature, top_p=decoding.top_p,
                            max_tokens=decoding.max_tokens)
        prompts = [{"prompt_token_ids": self._prompt_ids(m)} for m in messages_list]
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


def run_eval(model: str, problems: Sequence[Problem], decodings: Sequence[Decoding], out_dir: str,
             adapter: str | None = None, mode: str = "auto", with_base: bool = False, max_model_len: int = 2048,
             seed: int = 0, backend_factory: Callable[..., GenerateFn] = VLLMBackend) -> list[dict]:
    """Evaluate ``model`` (and ``adapter``) the ways ``mode`` asks, one engine at a time; see :func:`evaluate`."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not supported; expected one of {MODES}")
    meta = {"model": str(model), "adapter": adapter, "mode": mode, "seed": seed,
            "decodings": [dataclasses.asdict(d) for d in decodings]}
    tmp = Path(tempfile.mkdtemp(prefix="tinylora_eval_"))
    summary: list[dict] = []
    try:
        plan: list[tuple[str, dict]] = [("base", {"model_dir": model})] if with_base or adapter is None else []
        if adapter is not None:
            from .adapter_io import read_adapter

            rank = int(read_adapter(adapter)[1]["config"]["r"])
            lora_dir = None
            if mode == "lora":  # no merged folder needed, only the fidelity for the report
                lora_dir, fidelity = _export_lora(model, adapter, tmp)
                modes = ["lora"]
            else:
                merged_dir, fidelity = write_merged_model(model, adapter, str(tmp / "merged"))
                modes = resolve_modes(mode, True, fidelity)
                plan.append(("merged", {"model_dir": str(merged_dir)}))
            meta["merge_fidelity_bf16"] = fidelity
            if "lora" in modes:
                lora_dir = lora_dir or _export_lora(model, adapter, tmp)[0]
                plan.append(("lora", {"model_dir": model, "lora_dir": lora_dir, "lora_rank": rank}))
        for name, kwargs in plan:
            backend = backend_factory(max_model_len=max_model_len, seed=seed, **kwargs)
            try:
                rows = evaluate(problems, {name: backend}, decodings, tmp / name, meta)
            finally:
                if hasattr(backend, "close"):
                    backend.close()
            if name == "merged":
                for r in rows:
                    r["merge_fidelity_bf16"] = meta["merge_fidelity_bf16"]
            summary.extend(rows)
        _combine(out_dir, [tmp / name for name, _ in plan], summary, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _export_lora(model: str, adapter: str, tmp: Path) -> tuple[str, float]:
    """Write the adapter's exact LoRA (float32 factors) under ``tmp``; returns ``(folder, bf16 merge fidelity)``."""
    import torch
    from transformers import AutoModelForCausalLM

    from .adapter_io import load_adapter

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    loaded = load_adapter(adapter, hf)
    loaded.export_lora(str(tmp / "lora"))
    return str(tmp / "lora"), loaded.merge_fidelity(torch.bfloat16)[0]


def _combine(out_dir: str, parts: list[Path], summary: list[dict], meta: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for part in parts:
            f.write((part / "samples.jsonl").read_text(encoding="utf-8"))
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": summary}, indent=2))
    fields = list(dict.fromkeys(k for r in summary for k in r))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(summary)


__all__ = ["Decoding", "VLLMBackend", "aggregate", "default_decodings", "evaluate", "lora_rank_for",
           "resolve_modes", "run_eval", "score_response", "write_merged_model"]
