"""GSM8K and MATH-style JSONL -> verl RL parquet files.

Every row written has exactly the columns verl's ``examples/data_preprocess/gsm8k.py`` writes and
``verl.utils.dataset.rl_dataset.RLHFDataset`` reads::

    data_source   "openai/gsm8k" | MATH_DATA_SOURCE
    prompt        [{"role": "user", "content": <question + instruction>}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": <answer>}
    extra_info    {"split", "index", "answer", "question"}

GSM8K: the ground truth is the text after the last ``####`` of the reference answer with commas stripped
(``"1,234"`` -> ``"1234"``), and the instruction is verl's ``Let's think step by step and output the final answer
after "####".``. ``extra_info.index`` is the row's position in its source split, so a shuffled subset still points
back at the original row.

MATH-style: any JSONL with ``problem``/``solution`` fields; the ground truth is the content of the last
``\\boxed{...}`` of the solution (brace-balanced, :func:`tinylora_verl.tasks.rewards.last_boxed_content`), and the prompt
is the SimpleRL / Qwen2.5-Math boxed template. ``data_source`` defaults to ``DigitalLearningGmbH/MATH-lighteval``,
the name verl's own ``math_dataset.py`` writes: verl's ``default_compute_score`` routes it to its ``\\boxed{}``
scorer (``math_reward``, 0/1). The shorter ``"math"`` is routed to ``math_dapo`` instead, which prefers a Minerva
``Answer:`` line and scores -1/1, so it disagrees with the boxed prompt unless our reward function is configured.

Where GSM8K comes from when ``src`` is ``None`` (first hit wins):

1. the directory in ``$TINYLORA_VERL_GSM8K_DIR``;
2. ``../shared/data/gsm8k`` beside the repository checkout (a source checkout only);
3. the Hugging Face hub, ``openai/gsm8k`` config ``main`` (needs network).

``src="slice"`` selects the bundled MIT-licensed first 256 train / 256 test rows (:data:`GSM8K_SLICE_DIR`) for
offline demos; it is never picked silently, so a full run cannot end up training on 256 rows by accident.

Synthetic arithmetic: :func:`prepare_arithmetic` writes the rows of :mod:`tinylora_verl.tasks.arithmetic`.

Subsets are deterministic: with ``seed`` the rows are shuffled by ``random.Random(seed)``, then
``rows[offset:offset + limit]`` is taken. Torch-free on purpose: runs on a driver without a GPU stack.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylora_verl.tasks import arithmetic
from tinylora_verl.tasks.rewards import GSM8K_INSTRUCTION, last_boxed_content

GSM8K_DATA_SOURCE = "openai/gsm8k"
GSM8K_HUB_CONFIG = "main"
# Prompt styles: "verl" is verl's own GSM8K instruction (the paper's setup). "explicit" spells the answer format
# out; SmolLM2-135M ends ~10% of samples at T=1 with a "####" answer under it vs ~4% under "verl" (64 train
# problems x 4 samples, 256 tokens), which is what gives its GRPO groups reward variance on CPU.
GSM8K_INSTRUCTIONS = {
    "verl": GSM8K_INSTRUCTION,
    "explicit": 'Solve it step by step, then write the final answer as a number on the last line in the form '
                '"#### <number>", for example "#### 42".',
    "oneshot": GSM8K_INSTRUCTION,
}
# "oneshot": verl's instruction, after one worked example given as an earlier chat turn. SmolLM2-135M then ends
# 55% of samples with a "####" answer (vs 4% "verl", 10% "explicit"; 64 train problems x 4 samples at T=1,
# 256 tokens), and 88% of 4-sample groups mix formatted and unformatted answers: GRPO signal on CPU.
GSM8K_ONESHOT_TURNS = [
    {"role": "user", "content": "A shop sells pencils in packs of 6. Mia buys 7 packs. How many pencils does she "
                                "have? " + GSM8K_INSTRUCTION},
    {"role": "assistant", "content": "Each pack has 6 pencils. 7 packs have 7 * 6 = 42 pencils.\n#### 42"},
]
GSM8K_SPLITS = ("train", "test")
GSM8K_ENV_VAR = "TINYLORA_VERL_GSM8K_DIR"
GSM8K_SLICE_DIR = Path(__file__).resolve().parent / "data_files" / "gsm8k_slice"
GSM8K_BESIDE_REPO_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
MATH_DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ABILITY = "math"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Subset:
    """Which rows to keep: shuffle with ``seed`` (if given), then take ``limit`` rows starting at ``offset``."""

    limit: int | None = None
    offset: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit <= 0):
            raise ValueError(f"limit={self.limit!r} must be a positive int or None (all rows)")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"offset={self.offset!r} must be an int >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an int or None (keep file order)")

    def select(self, rows: Sequence[dict]) -> list[tuple[int, dict]]:
        """``(original_index, row)`` pairs of the kept rows, in output order."""
        order = list(range(len(rows)))
        if self.seed is not None:
            random.Random(self.seed).shuffle(order)
        if self.offset >= len(order):
            raise ValueError(f"offset={self.offset} is past the end of the {len(order)} available rows (allowed: "
                             f"0 <= offset < {len(order)})")
        end = None if self.limit is None else self.offset + self.limit
        return [(i, rows[i]) for i in order[self.offset:end]]


# ---------------------------------------------------------------------------------------------- records


def extract_gsm8k_ground_truth(answer: Any) -> str:
    """``"...\\n#### 1,234"`` -> ``"1234"``; raises ``ValueError`` when there is no ``####`` answer."""
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError(f"GSM8K answer must be a string containing '#### <final answer>', got {_short(answer)}")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError(f"GSM8K answer has nothing after '####': {_short(answer)}")
    return final


def gsm8k_record(question: str, answer: str, split: str, index: int, prompt_style: str = "verl") -> dict:
    """One verl row for a GSM8K problem (see the module docstring for the layout)."""
    if prompt_style not in GSM8K_INSTRUCTIONS:
        raise ValueError(f"prompt_style={prompt_style!r} is not supported; expected one of {sorted(GSM8K_INSTRUCTIONS)}")
    return {
        "data_source": GSM8K_DATA_SOURCE,
        "prompt": (GSM8K_ONESHOT_TURNS if prompt_style == "oneshot" else [])
        + [{"role": "user", "content": question + " " + GSM8K_INSTRUCTIONS[prompt_style]}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": extract_gsm8k_ground_truth(answer)},
        "extra_info": {"split": split, "index": index, "answer": answer, "question": question},
    }


# GSM8K solutions carry calculator annotations ("48/2 = <<48/2=24>>24") that are not text a model should learn to
# write; SFT rows drop them.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_sft_record(question: str, answer: str, split: str, index: int, prompt_style: str = "verl") -> dict:
    """One row for verl's SFT trainer: ``messages`` = the RL row's prompt, then the reference solution (calculator
    annotations removed, ``#### <answer>`` kept) as the assistant turn; ``data_source``/``extra_info`` as the RL
    row's."""
    rec = gsm8k_record(question, answer, split, index, prompt_style)
    solution = _CALCULATOR_ANNOTATION.sub("", answer)
    return {"messages": rec["prompt"] + [{"role": "assistant", "content": solution}],
            "data_source": rec["data_source"], "extra_info": rec["extra_info"]}


def math_record(problem: str, solution: str, split: str, index: int, data_source: str = MATH_DATA_SOURCE) -> dict:
    """One verl row for a MATH-style problem; the ground truth is the last ``\\boxed{}`` of ``solution``."""
    ground_truth = last_boxed_content(solution)
    if ground_truth is None or not ground_truth.strip():
        raise ValueError(f"MATH solution has no non-empty, brace-balanced \\boxed{{...}}: {_short(solution)}")
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem + "\n" + MATH_INSTRUCTION}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth.strip()},
        "extra_info": {"split": split, "index": index, "answer": solution, "question": problem},
    }


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------- I/O


def read_jsonl(path: str | os.PathLike, required: Sequence[str]) -> list[dict]:
    """Rows of a JSONL file; every row must be an object with string values for ``required``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {str(path)!r}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                # ValueError like every other malformed-file case, so callers catch one type.
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
            missing = [k for k in required if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing or non-string field(s) {missing}; required fields are "
                                 f"{list(required)}, found {sorted(row)}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def write_parquet(records: list[dict], out_path: str | os.PathLike) -> Path:
    """Write verl rows to ``out_path`` (parent directories are created)."""
    import pandas as pd

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame.from_records(records).to_parquet(out_path, index=False)
    return out_path


def _build(rows: Sequence[dict], subset: Subset, make: Callable[[int, dict], dict], where: str) -> list[dict]:
    records = []
    for index, row in subset.select(rows):
        try:
            records.append(make(index, row))
        except ValueError as e:
            raise ValueError(f"{where}, row {index}: {e}") from None
    return records


# ---------------------------------------------------------------------------------------------- GSM8K


def resolve_gsm8k_dir(src: str | os.PathLike | None) -> Path | None:
    """The local GSM8K directory to read, or ``None`` for the hub (fallback order in the module docstring)."""
    if src is not None:
        path = GSM8K_SLICE_DIR if str(src) == "slice" else Path(src).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"GSM8K source directory not found: {str(path)!r} (expected a directory with "
                                    f"train.jsonl/test.jsonl, 'slice', or None for the default search)")
        return path
    env = os.environ.get(GSM8K_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${GSM8K_ENV_VAR}={env!r} is not a directory")
        return path
    if GSM8K_BESIDE_REPO_DIR.is_dir():
        return GSM8K_BESIDE_REPO_DIR
    return None


def load_gsm8k_rows(src: str | os.PathLike | None, split: str, log: Log = print) -> list[dict]:
    """Raw ``{"question", "answer"}`` rows of one split, from a local directory or the hub."""
    if split not in GSM8K_SPLITS:
        raise ValueError(f"split={split!r} is not a GSM8K split; expected one of {GSM8K_SPLITS}")
    directory = resolve_gsm8k_dir(src)
    if directory is not None:
        rows = read_jsonl(directory / f"{split}.jsonl", required=("question", "answer"))
        log(f"[tinylora_verl.tasks.data] gsm8k/{split}: read {len(rows)} rows from {directory / f'{split}.jsonl'}")
        return rows
    try:
        import datasets

        hub_split = datasets.load_dataset(GSM8K_DATA_SOURCE, GSM8K_HUB_CONFIG, split=split)
    except Exception as e:
        raise RuntimeError(
            f"no local GSM8K found (${GSM8K_ENV_VAR} unset, {str(GSM8K_BESIDE_REPO_DIR)!r} absent) and loading "
            f"{GSM8K_DATA_SOURCE!r}/{GSM8K_HUB_CONFIG!r} from the hub failed ({type(e).__name__}: {e}); set "
            f"${GSM8K_ENV_VAR}, pass a directory, or pass 'slice' for the bundled 256-row demo slice"
        ) from e
    rows = [{"question": r["question"], "answer": r["answer"]} for r in hub_split]
    log(f"[tinylora_verl.tasks.data] gsm8k/{split}: read {len(rows)} rows from the hub ({GSM8K_DATA_SOURCE})")
    return rows


def prepare_gsm8k(src: str | os.PathLike | None, out_dir: str | os.PathLike, splits: Iterable[str] = GSM8K_SPLITS,
                  limit: int | None = None, offset: int = 0, seed: int | None = None,
                  log: Log = print, prompt_style: str = "verl", sft: bool = False) -> dict[str, Path]:
    """Write ``out_dir/{split}.parquet`` for each split; returns ``{split: parquet_path}`` in ``splits`` order.

    ``limit``/``offset``/``seed`` apply to each split independently (see :class:`Subset`). ``sft`` writes
    :func:`gsm8k_sft_record` rows (verl's SFT trainer) instead of RL rows.
    """
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits:
        raise ValueError(f"splits is empty; expected a subset of {GSM8K_SPLITS}")
    bad = [s for s in splits if s not in GSM8K_SPLITS]
    if bad:
        raise ValueError(f"splits={bad!r} are not GSM8K splits; expected a subset of {GSM8K_SPLITS}")
    subset = Subset(limit=limit, offset=offset, seed=seed)
    paths = {}
    for split in splits:
        rows = load_gsm8k_rows(src, split, log=log)
        make = gsm8k_sft_record if sft else gsm8k_record
        records = _build(rows, subset, lambda i, r, s=split: make(r["question"], r["answer"], s, i, prompt_style),
                         where=f"gsm8k/{split}")
        paths[split] = write_parquet(records, Path(out_dir) / f"{split}.parquet")
        log(f"[tinylora_verl.tasks.data] gsm8k/{split}: wrote {len(records)} {'SFT ' if sft else ''}rows to "
            f"{paths[split]}")
    return paths


# ---------------------------------------------------------------------------------------------- MATH


def prepare_math(jsonl: str | os.PathLike, out_path: str | os.PathLike, split: str = "test",
                 limit: int | None = None, offset: int = 0, seed: int | None = None,
                 data_source: str = MATH_DATA_SOURCE, log: Log = print) -> Path:
    """Write one parquet of boxed-template rows from a ``problem``/``solution`` JSONL; returns its path."""
    if not isinstance(data_source, str) or not data_source:
        raise ValueError(f"data_source={data_source!r} must be a non-empty string")
    rows = read_jsonl(jsonl, required=("problem", "solution"))
    log(f"[tinylora_verl.tasks.data] math/{split}: read {len(rows)} rows from {jsonl}")
    records = _build(rows, Subset(limit=limit, offset=offset, seed=seed),
                     lambda i, r: math_record(r["problem"], r["solution"], split, i, data_source),
                     where=f"{jsonl}")
    path = write_parquet(records, out_path)
    log(f"[tinylora_verl.tasks.data] math/{split}: wrote {len(records)} rows to {path}")
    return path


# ---------------------------------------------------------------------------------------------- arithmetic


def prepare_arithmetic(preset: str, out_dir: str | os.PathLike, seed: int = 0, train_size: int = 1000,
                       test_size: int = 200, prompt_style: str = "oneshot", log: Log = print) -> dict[str, Path]:
    """Write :func:`tinylora_verl.tasks.arithmetic.build_files` into ``out_dir``; returns ``{file name: path}``."""
    log(f"[tinylora_verl.tasks.data] arithmetic: preset {preset!r} = {arithmetic.resolve_task(preset)}, seed {seed}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in arithmetic.build_files(preset, seed, train_size, test_size, prompt_style).items():
        paths[name] = Path(out_dir) / name
        if name.endswith(".jsonl"):
            paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        else:
            write_parquet(rows, paths[name])
        log(f"[tinylora_verl.tasks.data] arithmetic: wrote {len(rows)} rows to {paths[name]}")
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylora_verl.tasks.data", description="Write verl RL parquet files.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{gsm8k,math,arithmetic}")

    def add_subset_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=int, default=None, help="keep at most this many rows per split (default: all)")
        p.add_argument("--offset", type=int, default=0, help="skip this many rows (after shuffling) (default: 0)")
        p.add_argument("--seed", type=int, default=None,
                       help="shuffle rows with random.Random(SEED) before --offset/--limit (default: file order)")

    g = sub.add_parser("gsm8k", help="GSM8K (local JSONL directory, bundled slice, or the hub)")
    g.add_argument("--src", default=None,
                   help=f"directory with train.jsonl/test.jsonl, or 'slice' for the bundled 256-row slice "
                        f"(default: ${GSM8K_ENV_VAR}, then ../shared/data/gsm8k beside the repo, then the hub)")
    g.add_argument("--out-dir", required=True, help="output directory; writes {split}.parquet")
    g.add_argument("--splits", nargs="+", default=list(GSM8K_SPLITS), choices=GSM8K_SPLITS,
                   help="splits to write (default: train test)")
    g.add_argument("--prompt-style", default="verl", choices=sorted(GSM8K_INSTRUCTIONS),
                   help="verl's instruction (default), an explicit '#### <number>' format, or verl's after a worked example")
    g.add_argument("--sft", action="store_true",
                   help="rows for verl's SFT trainer (messages: the prompt, then the reference solution) instead of RL")
    add_subset_flags(g)

    m = sub.add_parser("math", help="MATH-style JSONL with problem/solution fields (boxed-answer template)")
    m.add_argument("--jsonl", required=True, help="input JSONL with 'problem' and 'solution' string fields")
    m.add_argument("--out", required=True, help="output parquet path")
    m.add_argument("--split", default="test", help="value stored in extra_info.split (default: test)")
    m.add_argument("--data-source", default=MATH_DATA_SOURCE,
                   help=f"data_source column; selects the reward (default: {MATH_DATA_SOURCE})")
    add_subset_flags(m)

    a = sub.add_parser("arithmetic", help="synthetic integer arithmetic with worked solutions (RL, SFT and eval files)")
    a.add_argument("--preset", default=arithmetic.DEFAULT_PRESET, choices=sorted(arithmetic.PRESETS),
                   help=f"problem family and difficulty (default: {arithmetic.DEFAULT_PRESET})")
    a.add_argument("--seed", type=int, default=0, help="random.Random seed of both splits' draws (default: 0)")
    a.add_argument("--out-dir", required=True, help="writes train/test.parquet, sft_train/sft_val.parquet, test.jsonl")
    a.add_argument("--train-size", type=int, default=1000, help="train problems (default: 1000)")
    a.add_argument("--test-size", type=int, default=200, help="test problems (default: 200)")
    a.add_argument("--prompt-style", default="oneshot", choices=arithmetic.PROMPT_STYLES,
                   help="a worked example as an earlier chat turn (default), or the question alone")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``python -m tinylora_verl.tasks.data gsm8k --out-dir ~/data/gsm8k --limit 256``."""
    args = build_parser().parse_args(argv)
    if args.dataset == "arithmetic":
        prepare_arithmetic(args.preset, args.out_dir, seed=args.seed, train_size=args.train_size,
                           test_size=args.test_size, prompt_style=args.prompt_style)
    elif args.dataset == "gsm8k":
        prepare_gsm8k(args.src, args.out_dir, splits=args.splits, limit=args.limit, offset=args.offset,
                      seed=args.seed, prompt_style=args.prompt_style, sft=args.sft)
    else:
        prepare_math(args.jsonl, args.out, split=args.split, limit=args.limit, offset=args.offset, seed=args.seed,
                     data_source=args.data_source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
