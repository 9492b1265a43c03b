"""Evaluate a base model and a TinyLoRA adapter on math benchmarks with vLLM; score, aggregate, write files.

Contract::

    evaluate(problems, backends={mode: generate}, decodings=[...], out_dir) -> list[summary rows]

``generate(messages_list, decoding) -> [[response, ...] per prompt]`` is any callable (a response is a string or
``(text, num_tokens)``); :class:`tinylora_verl.verl.generation.VLLMBackend` is the real one, tests inject a fake. Every response is graded with
:func:`tinylora_verl.tasks.rewards.compute_score`:

* GSM8K and the arithmetic task: ``acc`` = strict (last ``#### <n>``), ``acc_lenient`` = last number, ``formatted`` =
  has a ``#### <n>``;
* MATH-style: ``acc`` = last ``\\boxed{}`` equivalent per math-verify, ``formatted`` = has a non-empty ``\\boxed{}``;
* ``reward`` = the training reward with ``format_score`` 0.1 (1 exact, 0.1 well-formed but wrong, else 0).

One summary row per benchmark x mode x decoding: mean accuracy over all responses (greedy: pass@1; sampled: the
mean over K samples) with its 95% bootstrap interval over problems (``acc_low``, ``acc_high``), pass@K, format rate, mean reward, the share of problems whose K samples are neither all
formatted nor all unformatted (``mixed_format``) and whose rewards are not all equal (``mixed_reward``: GRPO groups
with a non-zero advantage), mean response length, wall time. Files in ``out_dir``: ``samples.jsonl`` (one line per
response), ``summary.json`` (rows + run metadata, incl. bf16 merge fidelity) and ``summary.csv``. Where the base ran
beside adapter modes, ``paired.json``/``paired.csv`` (also under ``summary.json``'s ``paired``) hold each mode
against the base on the same problems (:func:`tinylora_verl.apps.stats.compare_modes`): the accuracy difference
with its 95% paired-bootstrap interval and p-value, and for greedy decoding the exact McNemar test.

Modes: ``base`` (no adapter), ``merged`` (``cast_bf16(W + ΔW)`` formed in float32 and written to a temporary HF
folder vLLM loads), ``lora`` (the exact rank-r LoRA ``B = UΣM, A = Vᵀ`` served by vLLM's LoRA support, which works
on vLLM CPU 0.31; ``max_lora_rank`` is the smallest value vLLM allows that is >= r, and a rank-2 LoRA loads into
rank-8 slots without padding). ``auto`` = merged, plus lora when the bf16 merge fidelity is below 0.99 (ΔW partly
rounded away by the cast). Without an adapter only ``base`` runs; ``with_base`` adds it beside the adapter modes,
and for each adapter mode a zero-adapter control (``merged_v0``, ``lora_v0``: the same adapter with v = 0, exported
and served the same way), which isolates what the serving path itself changes: the control is compared with the
base, and the adapter with its control.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..tasks.problems import Problem
from ..tasks.rewards import compute_score, resolve_method
from .export import export
from .stats import bootstrap_interval, compare_modes, per_problem

MODES = ("merged", "lora", "both", "auto")
CONTROL = "{}_v0"  # the zero-adapter control of a mode
FORMAT_SCORE = 0.1
AUTO_FIDELITY = 0.99

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
    # The data source's own rule: the "####" answer for GSM8K and the arithmetic task, the boxed one otherwise.
    method = resolve_method(problem.data_source)
    gsm8k = method == "strict"
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
    low, high = bootstrap_interval(list(per_problem(rows).values()))
    return {
        "problems": len(groups),
        "responses": len(rows),
        "acc": _mean([float(r["correct"]) for r in rows]),
        "acc_low": low,
        "acc_high": high,
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
    summary, graded = [], []
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
                    graded += [{k: r[k] for k in ("benchmark", "decoding", "mode", "index", "correct")} for r in rows]
                    tokens = sum(r["num_tokens"] or 0 for r in rows)
                    summary.append({"benchmark": bench, "mode": mode, "decoding": dec.name, "n": dec.n,
                                    "temperature": dec.temperature, "max_tokens": dec.max_tokens, **aggregate(rows),
                                    "seconds": round(seconds, 2),
                                    "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None})
    _write(out, summary, compare_modes(graded), meta or {})
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def _write(out: Path, summary: list[dict], paired: list[dict], meta: dict) -> None:
    """``summary.json`` (meta, rows, paired comparisons), ``summary.csv`` and, if any, ``paired.csv``."""
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": summary, "paired": paired}, indent=2))
    _write_csv(out / "summary.csv", summary)
    if paired:
        _write_csv(out / "paired.csv", paired)


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


def run_eval(model: str, problems: Sequence[Problem], decodings: Sequence[Decoding], out_dir: str,
             adapter: str | None = None, mode: str = "auto", with_base: bool = False, max_model_len: int = 2048,
             seed: int = 0, backend_factory: Optional[Callable[..., GenerateFn]] = None) -> list[dict]:
    """Evaluate ``model`` (and ``adapter``) the ways ``mode`` asks, one engine at a time; see :func:`evaluate`.
    ``backend_factory`` builds a :data:`GenerateFn` per engine (default: vLLM, :class:`tinylora_verl.verl.generation.VLLMBackend`)."""
    if backend_factory is None:
        from ..verl.generation import VLLMBackend as backend_factory
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not supported; expected one of {MODES}")
    meta = {"model": str(model), "adapter": adapter, "mode": mode, "seed": seed,
            "decodings": [dataclasses.asdict(d) for d in decodings]}
    tmp = Path(tempfile.mkdtemp(prefix="tinylora_eval_"))
    summary: list[dict] = []
    try:
        plan: list[tuple[str, dict]] = [("base", {"model_dir": model})] if with_base or adapter is None else []
        if adapter is not None:
            # One load of the base: the merged folder unless only the LoRA is served, the LoRA where it may be.
            done = export(model, adapter, merged_out=None if mode == "lora" else str(tmp / "merged"),
                          lora_out=None if mode == "merged" else str(tmp / "lora"))
            modes = ["lora"] if mode == "lora" else resolve_modes(mode, True, done.fidelity)
            meta["merge_fidelity_bf16"] = done.fidelity
            if done.merged is not None:
                plan.append(("merged", {"model_dir": str(done.merged)}))
            if "lora" in modes:
                plan.append(("lora", {"model_dir": model, "lora_dir": str(done.lora), "lora_rank": done.r}))
            if with_base:
                zero = export(model, adapter, merged_out=None if done.merged is None else str(tmp / "merged_v0"),
                              lora_out=None if "lora" not in modes else str(tmp / "lora_v0"), zero_v=True)
                if zero.merged is not None:
                    plan.append((CONTROL.format("merged"), {"model_dir": str(zero.merged)}))
                if "lora" in modes:
                    plan.append((CONTROL.format("lora"), {"model_dir": model, "lora_dir": str(zero.lora),
                                                          "lora_rank": zero.r}))
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


def _combine(out_dir: str, parts: list[Path], summary: list[dict], meta: dict) -> list[dict]:
    """Concatenate the engines' samples into ``out_dir`` and write the summary with the paired comparisons of the
    modes against the base (the engines ran one at a time, so the pairs are formed only here)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graded = []
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for part in parts:
            text = (part / "samples.jsonl").read_text(encoding="utf-8")
            f.write(text)
            graded += [json.loads(line) for line in text.splitlines() if line.strip()]
    seed = int(meta.get("seed") or 0)
    paired = compare_modes(graded, seed=seed)
    for mode in ("merged", "lora"):  # the adapter against its own serving path with v = 0
        paired += [p for p in compare_modes([r for r in graded if r["mode"] in (mode, CONTROL.format(mode))],
                                            reference=CONTROL.format(mode), seed=seed)]
    _write(out, summary, paired, meta)
    return paired


__all__ = ["Decoding", "aggregate", "default_decodings", "evaluate", "resolve_modes", "run_eval", "score_response"]
