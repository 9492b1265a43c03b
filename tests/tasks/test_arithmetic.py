"""Tests for tinylora_verl.tasks.arithmetic: determinism, split disjointness, correct solutions, reward, CLI."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from tinylora_verl.tasks import arithmetic
from tinylora_verl.tasks.arithmetic import (
    DATA_SOURCE,
    DEFAULT_PRESET,
    PRESETS,
    ArithmeticTask,
    build_files,
    generate,
    oneshot_example,
    prompt_messages,
    rl_record,
    score,
    sft_record,
    split_of,
)
from tinylora_verl.tasks.data import GSM8K_INSTRUCTION, build_parser, gsm8k_record, main, prepare_arithmetic
from tinylora_verl.tasks.rewards import compute_score, extract_gsm8k_answer, resolve_method

RL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]
STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)")
QUIET = lambda msg: None


def _expressions(preset: str, split: str, seeds, size: int = 200) -> list[str]:
    return [p.expression for seed in seeds for p in generate(preset, split, size, seed)]


# ---------------------------------------------------------------------------------------------- generation


def test_presets_and_default():
    assert DEFAULT_PRESET in PRESETS
    assert all(isinstance(t, ArithmeticTask) for t in PRESETS.values())
    assert {t.family for t in PRESETS.values()} == {"chain", "word"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_generation_is_deterministic_per_seed(preset):
    assert generate(preset, "train", 50, seed=3) == generate(preset, "train", 50, seed=3)
    assert generate(preset, "train", 50, seed=3) != generate(preset, "train", 50, seed=4)
    # Prefix-stable: a smaller set is the start of a larger one.
    assert generate(preset, "test", 20, seed=3) == generate(preset, "test", 40, seed=3)[:20]


def test_generation_does_not_touch_global_rng():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate(DEFAULT_PRESET, "train", 20, seed=0)
    assert random.random() == expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_splits_are_disjoint_across_seeds(preset):
    train = _expressions(preset, "train", range(4))
    test = _expressions(preset, "test", range(4), size=50)
    assert not set(train) & set(test)
    assert {split_of(e) for e in train} == {"train"} and {split_of(e) for e in test} == {"test"}
    for seed in range(4):  # no duplicates within a split
        one = _expressions(preset, "test", [seed], size=50)
        assert len(set(one)) == len(one)


def test_splits_are_disjoint_across_families():
    word_test = set(_expressions("word2", "test", range(3)))
    chain_train = set(_expressions("chain3", "train", range(3), size=1000))
    assert word_test and chain_train and not word_test & chain_train
    # The key is the arithmetic: the same expression lands in the same split whatever the wording.
    assert all(split_of(e) == "test" for e in word_test)


def test_split_of_is_a_stable_hash():
    # Pinned: a change to the hash (salt, bucket count, byte order) would silently mix old train and test sets.
    assert [split_of(e) for e in ("1 + 1", "1 + 2", "1 + 26", "1 + 29", "1 + 38")] == [
        "train", "train", "test", "test", "test"]
    tests = sum(split_of(f"{a} + {b}") == "test" for a in range(1, 60) for b in range(1, 60))
    assert 0.15 < tests / 59**2 < 0.25


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_oneshot_example_has_the_task_shape_and_is_never_a_problem(preset):
    example, task = oneshot_example(preset), PRESETS[preset]
    assert example == oneshot_example(task)
    assert example.family == task.family and example.solution.count(" = ") == task.operands - 1
    for split in ("train", "test"):
        assert example.expression not in _expressions(preset, split, range(3))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_solutions_are_correct_arithmetic(preset):
    task = PRESETS[preset]
    for p in generate(preset, "train", 200, seed=1) + generate(preset, "test", 50, seed=1):
        assert p.family == task.family
        assert eval(p.expression) == p.answer  # noqa: S307 -- digits, operators and parentheses only
        assert p.solution.endswith(f"\n#### {p.answer}")
        steps = STEP.findall(p.solution.rsplit("\n", 1)[0])
        assert len(steps) == task.operands - 1
        for x, op, y, z in steps:
            assert eval(f"{x} {op} {y}") == int(z)  # noqa: S307
            assert task.allow_negative or int(z) >= 0
        assert int(steps[-1][3]) == p.answer
        assert extract_gsm8k_answer(p.solution) == str(p.answer)
        assert score(p.solution, p.answer) == 1.0
        if task.family == "chain":
            assert p.question == f"What is {p.expression}?"


def test_multiplication_parenthesises_the_running_sum():
    problems = generate("chain3_mul", "train", 300, seed=0)
    bracketed = [p for p in problems if p.expression.startswith("(")]
    assert bracketed and all(") * " in p.expression for p in bracketed)
    assert any("*" in p.expression for p in problems)
    assert all(2 <= int(p.expression.split(" * ")[1].split()[0]) <= 9 for p in problems if " * " in p.expression)


def test_digits_and_negative_values():
    task = ArithmeticTask("chain", operands=4, min_digits=2, max_digits=2, ops="-", allow_negative=True)
    problems = generate(task, "train", 100, seed=0)
    assert any(p.answer < 0 for p in problems)
    numbers = [int(n) for p in problems for n in re.findall(r"\d+", p.expression)]
    assert min(numbers) >= 10 and max(numbers) <= 99
    assert all(eval(p.expression) == p.answer for p in problems)  # noqa: S307


def test_word_problems_use_only_allowed_operators():
    problems = generate(ArithmeticTask("word", ops="+-"), "train", 100, seed=0)
    assert all("*" not in p.expression for p in problems)

    def template_of(question):
        return {t.ops for t in arithmetic.TEMPLATES
                if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t.question)), question)}

    # Every template whose operators are allowed is used, and none other.
    assert set().union(*(template_of(p.question) for p in problems)) == {"+-", "-+", "-", "+"}


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "poem"}, r"family='poem' is not supported; expected one of \('chain', 'word'\)"),
    ({"operands": 1}, r"operands=1 must be an int in 2..10"),
    ({"operands": True}, r"operands=True must be an int in 2..10"),
    ({"family": "word", "operands": 4}, r"operands=4 is not allowed for family 'word'"),
    ({"min_digits": 0}, r"min_digits=0 must be an int in 1..6"),
    ({"max_digits": 7}, r"max_digits=7 must be an int in 1..6"),
    ({"min_digits": 3, "max_digits": 2}, r"min_digits=3 > max_digits=2"),
    ({"ops": ""}, r"ops='' must be a non-empty string of distinct operators from '\+-\*'"),
    ({"ops": "+/"}, r"ops='\+/' must be a non-empty string"),
    ({"ops": "++"}, r"ops='\+\+' must be a non-empty string of distinct operators"),
    ({"max_multiplier": 1}, r"max_multiplier=1 must be an int in 2..20"),
    ({"family": "word", "ops": "*"}, r"ops='\*' matches no word template"),
])
def test_bad_task(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kwargs)


@pytest.mark.parametrize("args, match", [
    (("nope", "train", 5), r"preset='nope' is not known; expected one of \['add2', 'chain2'"),
    ((DEFAULT_PRESET, "validation", 5), r"split='validation' is not supported; expected one of \('train', 'test'\)"),
    ((DEFAULT_PRESET, "train", 0), r"size=0 must be a positive int"),
    ((DEFAULT_PRESET, "train", 5, "1"), r"seed='1' must be an int"),
])
def test_bad_generate_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        generate(*args)


def test_too_small_a_problem_space_is_refused():
    tiny = ArithmeticTask("chain", operands=2, min_digits=1, max_digits=1, ops="+")
    with pytest.raises(RuntimeError, match=r"found only \d+ of 100 distinct test problems .* too small"):
        generate(tiny, "test", 100)


def test_bad_prompt_style_and_preset():
    with pytest.raises(ValueError, match=r"prompt_style='fancy' is not supported; expected one of \('oneshot', "):
        prompt_messages(DEFAULT_PRESET, "Q?", prompt_style="fancy")
    with pytest.raises(ValueError, match=r"preset='poem' is not known"):
        prompt_messages("poem", "Q?")
    with pytest.raises(ValueError, match=r"prompt_style='fancy'"):
        build_files(DEFAULT_PRESET, train_size=1, test_size=1, prompt_style="fancy")


# ---------------------------------------------------------------------------------------------- reward


def test_data_source_uses_the_strict_grader():
    assert resolve_method(DATA_SOURCE) == "strict"
    assert compute_score(DATA_SOURCE, "7 + 5 = 12.\n#### 12", "12") == 1.0


@pytest.mark.parametrize("solution, gt, format_score, expected", [
    ("14 + 27 = 41. 41 - 9 = 32.\n#### 32", 32, 0.0, 1.0),
    ("#### 32", "32", 0.0, 1.0),
    ("#### 32.0", 32, 0.0, 1.0),
    ("#### -4", -4, 0.0, 1.0),
    ("#### 33", 32, 0.0, 0.0),
    ("#### 33", 32, 0.1, 0.1),
    ("The answer is 32.", 32, 0.1, 0.0),  # strict: no "####", no reward even though the number is right
    ("#### 4", -4, 0.0, 0.0),
    ("", 32, 0.1, 0.0),
    (None, 32, 0.1, 0.0),
])
def test_score(solution, gt, format_score, expected):
    assert score(solution, gt, format_score=format_score) == expected


# ---------------------------------------------------------------------------------------------- records


def test_prompt_styles():
    example = oneshot_example("chain3")
    oneshot = prompt_messages("chain3", "What is 1 + 2 + 3?", "oneshot")
    assert oneshot == [{"role": "user", "content": f"{example.question} {GSM8K_INSTRUCTION}"},
                       {"role": "assistant", "content": example.solution},
                       {"role": "user", "content": f"What is 1 + 2 + 3? {GSM8K_INSTRUCTION}"}]
    assert example.solution.endswith(f"\n#### {example.answer}")
    assert prompt_messages("chain3", "What is 1 + 2 + 3?", "plain") == oneshot[2:]
    assert prompt_messages("word2", "Q?")[0]["content"] == f"{oneshot_example('word2').question} {GSM8K_INSTRUCTION}"


def test_records_match_the_gsm8k_layout():
    p = generate(DEFAULT_PRESET, "test", 1, seed=0)[0]
    row = rl_record(DEFAULT_PRESET, p, "test", 7)
    reference = gsm8k_record(p.question, p.solution, "test", 7, prompt_style="oneshot")
    assert list(row) == list(reference) == RL_COLUMNS
    assert row["data_source"] == DATA_SOURCE and row["ability"] == reference["ability"]
    assert row["reward_model"] == {"style": "rule", "ground_truth": str(p.answer)} == reference["reward_model"]
    assert row["extra_info"] == reference["extra_info"]
    assert row["prompt"][-1] == reference["prompt"][-1]
    sft = sft_record(DEFAULT_PRESET, p)
    assert list(sft) == ["messages"]
    assert sft["messages"][:-1] == row["prompt"]
    assert sft["messages"][-1] == {"role": "assistant", "content": p.solution}


def test_prepare_arithmetic_writes_every_file(tmp_path):
    paths = prepare_arithmetic("word2", tmp_path / "out", seed=2, train_size=30, test_size=10, log=QUIET)
    assert sorted(paths) == ["sft_train.parquet", "sft_val.parquet", "test.jsonl", "test.parquet", "train.parquet"]
    train, test = pd.read_parquet(paths["train.parquet"]), pd.read_parquet(paths["test.parquet"])
    assert list(train.columns) == list(test.columns) == RL_COLUMNS
    assert (len(train), len(test)) == (30, 10)
    assert list(test["extra_info"].map(lambda e: e["index"])) == list(range(10))
    assert set(train["data_source"]) == {DATA_SOURCE}
    sft = pd.read_parquet(paths["sft_train.parquet"])
    assert list(sft.columns) == ["messages"] and len(sft) == 30
    assert [m["role"] for m in sft["messages"][0]] == ["user", "assistant", "user", "assistant"]
    assert len(pd.read_parquet(paths["sft_val.parquet"])) == 10
    rows = [json.loads(line) for line in paths["test.jsonl"].read_text().splitlines()]
    assert [r["question"] for r in rows] == list(test["extra_info"].map(lambda e: e["question"]))
    truths = [r["ground_truth"] for r in test["reward_model"]]
    assert all(score(r["answer"], gt) == 1.0 for r, gt in zip(rows, truths))


def test_cli_writes_the_files(tmp_path, capsys):
    out = tmp_path / "arith"
    assert main(["arithmetic", "--preset", "chain2", "--seed", "5", "--out-dir", str(out), "--train-size", "20",
                 "--test-size", "8", "--prompt-style", "plain"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sft_train.parquet", "sft_val.parquet", "test.jsonl",
                                                     "test.parquet", "train.parquet"]
    test = pd.read_parquet(out / "test.parquet")
    assert len(test) == 8 and [len(p) for p in test["prompt"]] == [1] * 8
    expected = [str(p.answer) for p in generate("chain2", "test", 8, 5)]
    assert [r["ground_truth"] for r in test["reward_model"]] == expected
    printed = capsys.readouterr().out
    assert "preset 'chain2'" in printed and "wrote 20 rows to" in printed and "test.jsonl" in printed


def test_cli_defaults_and_bad_preset(capsys):
    args = build_parser().parse_args(["arithmetic", "--out-dir", "x"])
    assert (args.preset, args.seed, args.train_size, args.test_size, args.prompt_style) == (
        DEFAULT_PRESET, 0, 1000, 200, "oneshot")
    with pytest.raises(SystemExit):
        main(["arithmetic", "--out-dir", "x", "--preset", "hard"])
    assert "invalid choice: 'hard'" in capsys.readouterr().err
