"""Synthetic multi-step integer arithmetic with worked solutions, graded like GSM8K by the last ``#### <n>``.

Why: SmolLM2-135M solves almost no GSM8K, so an RL run on it shows format learning, not correctness. Here the
difficulty is a dial (:class:`ArithmeticTask`, named :data:`PRESETS`), set so that the base model's sampled accuracy
sits well inside (0, 1) and GRPO groups mix right and wrong answers: the default ``add2`` gives it 26% at T=1 (36%
greedy) with a third of 4-sample groups mixed (measurements beside :data:`PRESETS`).

Families:

* ``chain``: ``What is 23 + 45 - 17?`` evaluated left to right; a ``*`` multiplies the running value by a small
  factor (2..``max_multiplier``) and the prefix is parenthesised, so Python's ``eval`` of the expression agrees:
  ``(23 + 45) * 3 - 17``. Solution: one binary step per operator, ``23 + 45 = 68. 68 - 17 = 51.\\n#### 51``.
* ``word``: two-step GSM8K-like word problems from templates (3 numbers), whose operators are within ``ops``.

Splits are disjoint by construction: a problem belongs to the split its canonical expression hashes to,
``sha256(expression) -> bucket in 0..4``, test = bucket 0, train = buckets 1..4. A split's generator draws with
``random.Random(seed)`` and rejects problems of the other split and duplicates, so any seed's test set is
disjoint from any seed's train set (also across families: the key is the arithmetic, not the wording). The key
is the written expression, so ``7 + 5`` and ``5 + 7`` are different problems and may fall in different splits. A
task's one-shot example (:func:`oneshot_example`, same shape as its problems) is never a problem. Sets are
prefix-stable: the first 100 of a 200-problem test set are the 100-problem test set.

Rows: ``data_source`` is :data:`DATA_SOURCE` (``tinylora/arithmetic``), routed by
:func:`tinylora_verl.tasks.rewards.resolve_method` to the strict ``####`` grader; RL rows have the columns of
:func:`tinylora_verl.tasks.data.gsm8k_record`; SFT rows are ``{"messages": prompt + [assistant: solution]}``
(verl's multi-turn SFT dataset); ``test.jsonl`` rows are GSM8K-style ``{"question", "answer"}``.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass

# Not tinylora_verl.tasks.data: that module writes these files and parses their flags, so it imports this one.
from tinylora_verl.tasks.rewards import ARITHMETIC_DATA_SOURCE, GSM8K_INSTRUCTION, compute_score

DATA_SOURCE = ARITHMETIC_DATA_SOURCE
ABILITY = "math"  # verl's ability column, as for GSM8K
FAMILIES = ("chain", "word")
OPERATORS = "+-*"
SPLITS = ("train", "test")
PROMPT_STYLES = ("oneshot", "plain")
TEST_BUCKETS, NUM_BUCKETS = 1, 5
# The "oneshot" style shows one worked problem of the same task as an earlier chat turn: the first valid draw of
# random.Random(ONESHOT_SEED). It must match the task's shape: with a fixed two-step example, SmolLM2-135M answered
# one-step problems with two steps ("18 + 3 = 51. 51 - 9 = 20."; 8% greedy on 100 chain2 test problems).
ONESHOT_SEED = 20260207
NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Nora", "Omar", "Lily", "Ravi")


@dataclass(frozen=True)
class ArithmeticTask:
    """The problem distribution.

    ``operands`` numbers (word problems: exactly 3), each with ``min_digits..max_digits`` digits (digit count
    uniform, then the value uniform; 1-digit numbers are 1..9), joined by operators drawn uniformly from ``ops``;
    a ``*`` takes a factor in ``2..max_multiplier`` instead. Unless ``allow_negative``, a problem with a negative
    intermediate or final value is redrawn.
    """

    family: str = "chain"
    operands: int = 3
    min_digits: int = 1
    max_digits: int = 2
    ops: str = "+-"
    max_multiplier: int = 9
    allow_negative: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; expected one of {FAMILIES}")
        if isinstance(self.operands, bool) or not isinstance(self.operands, int) or not 2 <= self.operands <= 10:
            raise ValueError(f"operands={self.operands!r} must be an int in 2..10")
        if self.family == "word" and self.operands != 3:
            raise ValueError(f"operands={self.operands} is not allowed for family 'word': its templates use 3 numbers")
        for name in ("min_digits", "max_digits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 6:
                raise ValueError(f"{name}={value!r} must be an int in 1..6")
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits={self.min_digits} > max_digits={self.max_digits}; expected min <= max")
        if (not isinstance(self.ops, str) or not self.ops or set(self.ops) - set(OPERATORS)
                or len(set(self.ops)) != len(self.ops)):
            raise ValueError(f"ops={self.ops!r} must be a non-empty string of distinct operators from {OPERATORS!r}")
        mm = self.max_multiplier
        if isinstance(mm, bool) or not isinstance(mm, int) or not 2 <= mm <= 20:
            raise ValueError(f"max_multiplier={mm!r} must be an int in 2..20")
        if self.family == "word" and not self.templates():
            used = sorted({t.ops for t in TEMPLATES})
            raise ValueError(f"ops={self.ops!r} matches no word template; the templates use the operators {used}")

    def templates(self) -> list[_Template]:
        """The word templates whose operators are all in ``ops``."""
        return [t for t in TEMPLATES if set(t.ops) <= set(self.ops)]


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: ``answer`` = ``eval(expression)``; ``solution`` ends in ``"\\n#### <answer>"``."""

    family: str
    question: str
    expression: str
    answer: int
    solution: str


@dataclass(frozen=True)
class _Template:
    """A word problem: ``{a} {b} {c}`` are numbers, ``{k}`` a factor, ``{s1} {s2}`` the two step results."""

    ops: str
    question: str
    expression: str
    steps: tuple[str, str]
    solution: str


TEMPLATES = (
    _Template("+-", "{name} has {a} marbles. {name} wins {b} more and then gives {c} to a friend. How many marbles "
              "does {name} have now?", "{a} + {b} - {c}", ("{a} + {b}", "{s1} - {c}"),
              "After winning, {name} has {a} + {b} = {s1} marbles. After giving {c} away, {name} has "
              "{s1} - {c} = {s2} marbles."),
    _Template("+-", "A bakery bakes {a} muffins in the morning and {b} muffins in the afternoon. It sells {c} "
              "muffins. How many muffins are left?", "{a} + {b} - {c}", ("{a} + {b}", "{s1} - {c}"),
              "The bakery bakes {a} + {b} = {s1} muffins. After selling {c}, {s1} - {c} = {s2} muffins are left."),
    _Template("-+", "A bus has {a} passengers. At the first stop {b} passengers get off, and at the second stop {c} "
              "get on. How many passengers are on the bus now?", "{a} - {b} + {c}", ("{a} - {b}", "{s1} + {c}"),
              "After the first stop there are {a} - {b} = {s1} passengers. After the second stop there are "
              "{s1} + {c} = {s2} passengers."),
    _Template("-", "{name} has {a} stickers, gives {b} to a sister and {c} to a brother. How many stickers does "
              "{name} have left?", "{a} - {b} - {c}", ("{a} - {b}", "{s1} - {c}"),
              "After giving {b} to the sister, {name} has {a} - {b} = {s1} stickers. After giving {c} to the "
              "brother, {name} has {s1} - {c} = {s2} stickers."),
    _Template("+", "A farm has {a} cows, {b} sheep and {c} goats. How many animals does the farm have?",
              "{a} + {b} + {c}", ("{a} + {b}", "{s1} + {c}"),
              "There are {a} + {b} = {s1} cows and sheep. With the goats there are {s1} + {c} = {s2} animals."),
    _Template("*-", "A box holds {a} pencils. {name} buys {k} boxes and gives away {c} pencils. How many pencils "
              "does {name} have left?", "{a} * {k} - {c}", ("{a} * {k}", "{s1} - {c}"),
              "{k} boxes hold {a} * {k} = {s1} pencils. After giving {c} away, {name} has {s1} - {c} = {s2} "
              "pencils."),
    _Template("*+", "Each bag has {a} apples. {name} has {k} bags and {c} loose apples. How many apples does "
              "{name} have in total?", "{a} * {k} + {c}", ("{a} * {k}", "{s1} + {c}"),
              "The bags hold {a} * {k} = {s1} apples. With the loose ones, {name} has {s1} + {c} = {s2} apples."),
    _Template("+*", "{name} uses {a} red beads and {b} blue beads for each necklace and makes {k} necklaces. How "
              "many beads does {name} use?", "({a} + {b}) * {k}", ("{a} + {b}", "{s1} * {k}"),
              "Each necklace uses {a} + {b} = {s1} beads. {k} necklaces use {s1} * {k} = {s2} beads."),
)

# SmolLM2-135M-Instruct before training, "oneshot" prompt, 100 seed-0 test problems, 128 tokens (vLLM CPU, bf16):
# sampled accuracy at T=1 (4 samples each) / greedy / share of 4-sample groups with mixed correctness (GRPO signal).
#   add2 26% / 36% / 34%; chain2 21% / 33% / 37%; chain3_1d 15% / 29% / 42%; chain3 4% / 11% / 12%.
# Under the "plain" prompt (no example) add2 and chain2 score 0% (1% of samples end in "####"): the example is needed.
# chain3_mul and word2 were not measured (harder than chain3 is likely).
PRESETS = {
    "add2": ArithmeticTask("chain", operands=2, min_digits=1, max_digits=2, ops="+"),
    "chain2": ArithmeticTask("chain", operands=2, min_digits=1, max_digits=2, ops="+-"),
    "chain3_1d": ArithmeticTask("chain", operands=3, min_digits=1, max_digits=1, ops="+-"),
    "chain3": ArithmeticTask("chain", operands=3, min_digits=1, max_digits=2, ops="+-"),
    "chain3_mul": ArithmeticTask("chain", operands=3, min_digits=1, max_digits=2, ops="+-*", max_multiplier=9),
    "word2": ArithmeticTask("word", operands=3, min_digits=1, max_digits=2, ops="+-*", max_multiplier=9),
}
DEFAULT_PRESET = "add2"  # the one inside 25-40% sampled accuracy, with a third of the groups mixed


def resolve_task(task: str | ArithmeticTask) -> ArithmeticTask:
    """A preset name or a task -> the task."""
    if isinstance(task, ArithmeticTask):
        return task
    if task not in PRESETS:
        raise ValueError(f"preset={task!r} is not known; expected one of {sorted(PRESETS)} or an ArithmeticTask")
    return PRESETS[task]


# ---------------------------------------------------------------------------------------------- problems


def split_of(expression: str) -> str:
    """``"test"`` when ``sha256(expression)`` falls in the test bucket (1 of 5), else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode("utf-8")).digest()[:8], "big") % NUM_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _number(task: ArithmeticTask, rng: random.Random) -> int:
    digits = rng.randint(task.min_digits, task.max_digits)
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _draw_chain(task: ArithmeticTask, rng: random.Random) -> ArithmeticProblem | None:
    value = _number(task, rng)
    expression, steps = str(value), []
    for _ in range(task.operands - 1):
        op = rng.choice(task.ops)
        y = rng.randint(2, task.max_multiplier) if op == "*" else _number(task, rng)
        result = _apply(value, op, y)
        if result < 0 and not task.allow_negative:
            return None
        # Parenthesise a sum before a product, so precedence-respecting eval() agrees with left-to-right steps.
        if op == "*" and any(c in expression for c in "+-"):
            expression = f"({expression})"
        expression = f"{expression} {op} {y}"
        steps.append(f"{value} {op} {y} = {result}.")
        value = result
    return ArithmeticProblem("chain", f"What is {expression}?", expression, value,
                             " ".join(steps) + f"\n#### {value}")


def _draw_word(task: ArithmeticTask, rng: random.Random) -> ArithmeticProblem | None:
    t = rng.choice(task.templates())
    fields = {"name": rng.choice(NAMES), "a": _number(task, rng), "b": _number(task, rng), "c": _number(task, rng),
              "k": rng.randint(2, task.max_multiplier)}
    for i, step in enumerate(t.steps, start=1):
        x, op, y = step.format(**fields).split()
        fields[f"s{i}"] = _apply(int(x), op, int(y))
        if fields[f"s{i}"] < 0 and not task.allow_negative:
            return None
    answer = fields["s2"]
    return ArithmeticProblem("word", t.question.format(**fields), t.expression.format(**fields), answer,
                             t.solution.format(**fields) + f"\n#### {answer}")


def generate(task: str | ArithmeticTask, split: str, size: int, seed: int = 0) -> list[ArithmeticProblem]:
    """``size`` distinct problems of ``split``, drawn with ``random.Random(seed)`` (see the module docstring)."""
    task = resolve_task(task)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; expected one of {SPLITS}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size={size!r} must be a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    rng = random.Random(seed)
    draw = _draw_chain if task.family == "chain" else _draw_word
    seen = {oneshot_example(task).expression}
    problems: list[ArithmeticProblem] = []
    max_draws = 100 * size + 10_000
    for _ in range(max_draws):
        p = draw(task, rng)
        if p is None or p.expression in seen or split_of(p.expression) != split:
            continue
        seen.add(p.expression)
        problems.append(p)
        if len(problems) == size:
            return problems
    raise RuntimeError(f"found only {len(problems)} of {size} distinct {split} problems in {max_draws} draws of "
                       f"{task}; the problem space is too small: use more operands, digits or operators")


@functools.lru_cache(maxsize=64)
def oneshot_example(task: str | ArithmeticTask) -> ArithmeticProblem:
    """The worked example shown before every question of ``task``; never a problem of either split."""
    task = resolve_task(task)
    rng = random.Random(ONESHOT_SEED)
    draw = _draw_chain if task.family == "chain" else _draw_word
    while (example := draw(task, rng)) is None:
        pass  # a negative intermediate: redrawn, as in generate()
    return example


def score(solution: str, ground_truth: str | int, format_score: float = 0.0) -> float:
    """The training reward: 1.0 if the last ``#### <n>`` equals ``ground_truth``, ``format_score`` if another
    number follows ``####``, else 0.0 (:func:`tinylora_verl.tasks.rewards.compute_score` for :data:`DATA_SOURCE`)."""
    return compute_score(DATA_SOURCE, solution, str(ground_truth), format_score=format_score)


# ---------------------------------------------------------------------------------------------- records


def prompt_messages(task: str | ArithmeticTask, question: str, prompt_style: str = "oneshot") -> list[dict]:
    """The chat prompt: [the task's one-shot example as user/assistant turns +] user(question + GSM8K instruction)."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={prompt_style!r} is not supported; expected one of {PROMPT_STYLES}")
    turns = []
    if prompt_style == "oneshot":
        example = oneshot_example(task)
        turns = [{"role": "user", "content": f"{example.question} {GSM8K_INSTRUCTION}"},
                 {"role": "assistant", "content": example.solution}]
    return turns + [{"role": "user", "content": f"{question} {GSM8K_INSTRUCTION}"}]


def rl_record(task: str | ArithmeticTask, problem: ArithmeticProblem, split: str, index: int,
              prompt_style: str = "oneshot") -> dict:
    """One verl RL row, the layout of :func:`tinylora_verl.tasks.data.gsm8k_record`."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": prompt_messages(task, problem.question, prompt_style),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": str(problem.answer)},
        "extra_info": {"split": split, "index": index, "answer": problem.solution, "question": problem.question},
    }


def sft_record(task: str | ArithmeticTask, problem: ArithmeticProblem, prompt_style: str = "oneshot") -> dict:
    """One row for verl's multi-turn SFT dataset: the RL prompt followed by the worked solution."""
    messages = prompt_messages(task, problem.question, prompt_style)
    return {"messages": messages + [{"role": "assistant", "content": problem.solution}]}


def build_files(task: str | ArithmeticTask, seed: int = 0, train_size: int = 1000, test_size: int = 200,
                prompt_style: str = "oneshot") -> dict[str, list[dict]]:
    """The rows of each output file: ``train/test.parquet`` (RL), ``sft_train/sft_val.parquet`` (SFT; val = the
    test problems, whose loss is then held-out) and ``test.jsonl`` (GSM8K-style ``question``/``answer``)."""
    task = resolve_task(task)
    prompt_messages(task, "", prompt_style)  # validate before any work
    train, test = generate(task, "train", train_size, seed), generate(task, "test", test_size, seed)
    return {
        "train.parquet": [rl_record(task, p, "train", i, prompt_style) for i, p in enumerate(train)],
        "test.parquet": [rl_record(task, p, "test", i, prompt_style) for i, p in enumerate(test)],
        "sft_train.parquet": [sft_record(task, p, prompt_style) for p in train],
        "sft_val.parquet": [sft_record(task, p, prompt_style) for p in test],
        "test.jsonl": [{"question": p.question, "answer": p.solution} for p in test],
    }


__all__ = ["ArithmeticProblem", "ArithmeticTask", "DATA_SOURCE", "DEFAULT_PRESET", "PRESETS", "generate",
           "build_files", "oneshot_example", "prompt_messages", "rl_record", "score", "sft_record", "split_of"]
