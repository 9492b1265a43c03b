"""Evaluation benchmarks: where each comes from and how a row becomes a prompt plus a ground truth.

Contract: :func:`load_benchmark` returns :class:`Problem` objects whose ``messages`` are exactly the chat prompt
the training data uses (built by :func:`tinylora_verl.tasks.data.gsm8k_record` / :func:`~tinylora_verl.tasks.data.math_record`,
so eval and RL see the same text) and whose ``ground_truth`` is what :func:`tinylora_verl.tasks.rewards.compute_score`
grades against. ``data_source`` selects the reward: GSM8K rows are graded by the ``####`` rules, every other
benchmark by the last ``\\boxed{}`` and math-verify.

Sources, per benchmark (first that applies):

* ``source`` given: a local ``.jsonl`` file, a directory holding ``<split>.jsonl`` (or ``<name>.jsonl``; with no
  ``split`` asked for, also ``test.jsonl``: the Qwen2.5-Math evaluation layout ``evaluation/data/<name>/test.jsonl``,
  so that folder works as ``eval --data-dir`` for the benchmarks it holds, aime24 and gaokao2023en included, whose
  hub split is ``train``), or a hub dataset id loaded with ``datasets.load_dataset(id, config, split=...)``;
* GSM8K without ``source``: :func:`tinylora_verl.tasks.data.load_gsm8k_rows` (``$TINYLORA_VERL_GSM8K_DIR``, the shared
  checkout copy, then the hub);
* any other benchmark without ``source``: its registered hub id (network needed);
* a verl RL parquet (``source`` a ``.parquet`` file, or for ``arithmetic`` a directory holding ``<split>.parquet``:
  what ``tinylora-verl data arithmetic --out-dir DIR`` writes): each row's own ``prompt``, ``ground_truth`` and
  ``data_source``, so eval asks exactly what training asked. ``arithmetic`` has no hub copy; its test set is drawn
  from a seed (:mod:`tinylora_verl.tasks.arithmetic`).

Row fields: GSM8K needs ``question``/``answer`` (reference solution ending in ``#### <n>``). MATH-style rows need a
problem (``problem``, ``question`` or ``Problem``) and either a final answer (``answer``, ``final_answer``,
``Answer``; a list takes its first element) or a ``solution`` with a ``\\boxed{}``. A final answer loses its
unescaped ``$`` math delimiters (``"$48$, $384$"`` -> ``"48, 384"``, like Qwen2.5-Math's ``parse_ground_truth`` for
gaokao2023en and college_math, except that an escaped ``\\$`` stays). A row whose answer field is present but empty,
with no ``solution``, cannot be graded and is left out (the others keep their source ``index``): Qwen2.5-Math's
gaokao2023en file has two (ids ``HMMT2023General_9`` and ``052023SATS4_11``), so it yields 383 of its 385 rows.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rewards import ARITHMETIC_DATA_SOURCE
from .data import (
    GSM8K_DATA_SOURCE,
    GSM8K_INSTRUCTIONS,
    Subset,
    gsm8k_record,
    load_gsm8k_rows,
    math_record,
    read_jsonl,
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: default hub location and the ``data_source`` its rows are graded as."""

    name: str
    hub_id: str
    split: str
    data_source: str
    hub_config: str | None = None
    # Rows are verl RL parquet rows (prompt, reward_model, data_source) rather than question/answer JSONL.
    verl_rows: bool = False

    @property
    def is_gsm8k(self) -> bool:
        return self.data_source == GSM8K_DATA_SOURCE


# The hub ids are the ones the usual RL-for-reasoning evaluations load; override any with ``source=``.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("gsm8k", GSM8K_DATA_SOURCE, "test", GSM8K_DATA_SOURCE, hub_config="main"),
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", "HuggingFaceH4/MATH-500"),
        BenchmarkSpec("minerva_math", "math-ai/minervamath", "test", "math"),
        BenchmarkSpec("olympiadbench", "math-ai/olympiadbench", "test", "math"),
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", "aime24"),
        BenchmarkSpec("amc23", "zwhe99/amc23", "test", "math"),
        # Qwen2.5-Math evaluation/data/gaokao2023en/test.jsonl on the hub: one JSONL file, so its only split is "train".
        # Verified: HF file page (Gaokao2023-Math-En.jsonl), public loaders (split train; question/answer/source/id).
        BenchmarkSpec("gaokao2023en", "MARIO-Math-Reasoning/Gaokao2023-Math-En", "train", "math"),
        # Qwen2.5-Math evaluation/data/college_math/test.jsonl (2818 rows) on the hub.
        # Verified: HF viewer (split test, 2.82k rows) + public loaders (question/answer/data_topic/question_number).
        BenchmarkSpec("college_math", "di-zhang-fdu/College_Math_Test", "test", "math"),
        # The CPU study's task, generated locally from a seed; no hub id.
        BenchmarkSpec("arithmetic", "", "test", ARITHMETIC_DATA_SOURCE, verl_rows=True),
    )
}

# The first author's verl fork evaluates these eight; ``arithmetic`` is this package's CPU study task.
PAPER_SUITE = ("gsm8k", "math500", "minerva_math", "olympiadbench", "aime24", "amc23", "gaokao2023en", "college_math")

_PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
_ANSWER_FIELDS = ("answer", "final_answer", "Answer")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


@dataclass(frozen=True)
class Problem:
    """One evaluation item: chat ``messages``, the graded ``ground_truth`` and the row's source ``index``."""

    benchmark: str
    index: int
    messages: list[dict]
    ground_truth: str
    data_source: str


def get_spec(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks are {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def parse_benchmarks(text: str) -> list[str]:
    """``"gsm8k, math500"`` -> ``["gsm8k", "math500"]``; validates every name, rejects duplicates and empties."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--benchmarks {text!r} names no benchmark; choose from {sorted(BENCHMARKS)}")
    for n in names:
        get_spec(n)
    if len(set(names)) != len(names):
        raise ValueError(f"--benchmarks {text!r} lists a benchmark twice")
    return names


def _first(row: dict, fields: tuple[str, ...]) -> Any:
    for f in fields:
        value = row.get(f)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None and str(value).strip():
            return value
    return None


def _unanswered(row: dict) -> bool:
    """A MATH-style row with a problem and a present but empty answer field, and no solution to fall back on."""
    return (_first(row, _PROBLEM_FIELDS) is not None and any(f in row for f in _ANSWER_FIELDS)
            and _first(row, _ANSWER_FIELDS) is None and not isinstance(row.get("solution"), str))


def _math_problem(spec: BenchmarkSpec, index: int, row: dict, split: str, prompt_style: str = "verl") -> Problem:
    problem = _first(row, _PROBLEM_FIELDS)
    answer = _first(row, _ANSWER_FIELDS)
    if problem is None or (answer is None and not isinstance(row.get("solution"), str)):
        raise ValueError(f"{spec.name} row {index}: needs one of {list(_PROBLEM_FIELDS)} and one of "
                         f"{list(_ANSWER_FIELDS) + ['solution']}; found fields {sorted(row)}")
    # math_record takes the answer from a solution's last \boxed{}; a bare final answer is boxed so that the
    # prompt and ground-truth extraction stay in one place (data.py).
    solution = row["solution"] if answer is None else "\\boxed{" + _UNESCAPED_DOLLAR.sub("", str(answer)).strip() + "}"
    rec = math_record(str(problem), solution, split, index, spec.data_source)
    return Problem(spec.name, index, rec["prompt"], rec["reward_model"]["ground_truth"], spec.data_source)


def _gsm8k_problem(spec: BenchmarkSpec, index: int, row: dict, split: str, prompt_style: str = "verl") -> Problem:
    if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise ValueError(f"{spec.name} row {index}: needs string fields 'question' and 'answer'; found {sorted(row)}")
    rec = gsm8k_record(row["question"], row["answer"], split, index, prompt_style)
    return Problem(spec.name, index, rec["prompt"], rec["reward_model"]["ground_truth"], spec.data_source)


def _verl_row_problem(spec: BenchmarkSpec, index: int, row: dict, split: str, prompt_style: str = "verl") -> Problem:
    try:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
        ground_truth, data_source = str(row["reward_model"]["ground_truth"]), str(row["data_source"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{spec.name} row {index}: not a verl RL row (needs prompt messages, "
                         f"reward_model.ground_truth and data_source; found fields {sorted(row)})") from e
    extra = row.get("extra_info") or {}
    return Problem(spec.name, int(extra.get("index", index)), messages, ground_truth, data_source)


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_parquet(path).to_dict(orient="records")


def _load_rows(spec: BenchmarkSpec, source: str | os.PathLike | None, split: str,
               split_given: bool = True) -> list[dict]:
    if source is None and spec.is_gsm8k:
        return load_gsm8k_rows(None, split, log=lambda _: None)
    if source is None and spec.verl_rows:
        raise ValueError(f"{spec.name} has no hub copy: write it with `tinylora-verl data {spec.name} --out-dir DIR` "
                         f"and pass --data {spec.name}=DIR (or --data-dir with a {spec.name}/ folder)")
    if source is not None and str(source).endswith(".parquet"):
        return _read_parquet(Path(source).expanduser())
    if source is not None and spec.verl_rows:
        path = Path(source).expanduser() / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name}: {str(path)!r} not found (a folder written by `tinylora-verl data "
                                    f"{spec.name} --out-dir`, or a .parquet file of verl RL rows)")
        return _read_parquet(path)
    if source is not None:
        path = Path(source).expanduser()
        if path.is_dir():
            names = [f"{split}.jsonl", f"{spec.name}.jsonl"] + ([] if split_given else ["test.jsonl"])
            candidates = [path / n for n in dict.fromkeys(names)]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(f"{spec.name}: directory {str(path)!r} has neither "
                                        f"{' nor '.join(c.name for c in candidates)}")
            path = found[0]
        if path.is_file() or str(source).endswith(".jsonl"):
            return read_jsonl(path, required=())
    hub_id = spec.hub_id if source is None else str(source)
    try:
        import datasets

        rows = datasets.load_dataset(hub_id, spec.hub_config, split=split)
    except Exception as e:
        raise RuntimeError(f"{spec.name}: loading hub dataset {hub_id!r} (split {split!r}) failed "
                           f"({type(e).__name__}: {e}); pass a local JSONL file or directory instead") from e
    return [dict(r) for r in rows]


def load_benchmark(name: str, source: str | os.PathLike | None = None, split: str | None = None,
                   limit: int | None = None, offset: int = 0, prompt_style: str = "verl") -> list[Problem]:
    """The problems of benchmark ``name`` (rows ``offset:offset+limit`` in source order); see the module docstring.

    ``prompt_style`` (GSM8K only; see :data:`tinylora_verl.tasks.data.GSM8K_INSTRUCTIONS`) must match the training
    data's, e.g. ``"oneshot"`` for the CPU recipes."""
    spec = get_spec(name)
    if prompt_style not in GSM8K_INSTRUCTIONS:
        raise ValueError(f"prompt_style={prompt_style!r} is not supported; expected one of {sorted(GSM8K_INSTRUCTIONS)}")
    if prompt_style != "verl" and (spec.verl_rows or str(source).endswith(".parquet")):
        raise ValueError(f"prompt_style={prompt_style!r} does not apply to verl parquet rows: {name!r} rows carry "
                         f"the prompt they were trained with")
    if prompt_style != "verl" and not spec.is_gsm8k:
        raise ValueError(f"prompt_style={prompt_style!r} applies to gsm8k only; {name!r} uses the boxed-answer prompt")
    split_given = bool(split)
    split = split or spec.split
    rows = list(enumerate(_load_rows(spec, source, split, split_given)))
    verl_rows = spec.verl_rows or str(source).endswith(".parquet")
    if not spec.is_gsm8k and not verl_rows:
        rows = [(i, row) for i, row in rows if not _unanswered(row)]
    make = _verl_row_problem if verl_rows else _gsm8k_problem if spec.is_gsm8k else _math_problem
    return [make(spec, i, row, split, prompt_style) for _, (i, row) in Subset(limit=limit, offset=offset).select(rows)]


__all__ = ["BENCHMARKS", "PAPER_SUITE", "BenchmarkSpec", "Problem", "get_spec", "load_benchmark", "parse_benchmarks"]
