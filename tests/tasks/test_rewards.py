"""Tests for tinylora_verl.tasks.rewards: case tables, verl agreement, bad input, threads, verl's call signature."""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tinylora_verl.tasks import rewards
from tinylora_verl.tasks.rewards import (
    RewardConfig,
    compute_score,
    extract_gsm8k_answer,
    gsm8k_lenient,
    gsm8k_strict,
    last_boxed_content,
    math_boxed,
    normalize_number,
    resolve_method,
)

FMT = 0.1  # the CPU learning recipe's format_score

# (solution, ground_truth, strict reward, lenient reward) with format_score=FMT
GSM8K_CASES = [
    ("#### 18", "18", 1.0, 1.0),
    ("So she has 18 apples.\n#### 18", "18", 1.0, 1.0),
    ("#### 18.0", "18", 1.0, 1.0),
    ("#### 18.00", "18", 1.0, 1.0),
    ("#### 18.", "18", 1.0, 1.0),
    ("#### 1,234", "1234", 1.0, 1.0),
    ("#### 1234", "1,234", 1.0, 1.0),
    ("#### $18", "18", 1.0, 1.0),
    ("#### $1,234.50", "1234.5", 1.0, 1.0),
    ("#### 18%", "18", 1.0, 1.0),
    ("#### -3", "-3", 1.0, 1.0),
    ("#### -3", "3", FMT, FMT),
    ("#### 3", "-3", FMT, FMT),
    ("#### \u22123", "-3", 1.0, 1.0),  # Unicode minus
    ("#### -$5", "-5", 1.0, 1.0),
    ("#### $-5", "-5", 1.0, 1.0),
    ("#### .5", "0.5", 1.0, 1.0),
    ("#### 0.5", ".5", 1.0, 1.0),
    ("####18", "18", 1.0, 1.0),
    ("####   18", "18", 1.0, 1.0),
    ("#### 17", "18", FMT, FMT),
    ("#### 18 apples", "18", 1.0, 1.0),
    ("#### 17\nwait, no\n#### 18", "18", 1.0, 1.0),  # last marker wins
    ("#### 18\nwait, no\n#### 17", "18", FMT, FMT),
    ("The answer is 18", "18", 0.0, 1.0),  # no marker: strict gives nothing
    ("The answer is 18.", "18", 0.0, 1.0),
    ("18 apples, then 5 more", "18", 0.0, FMT),  # lenient: the last number is 5
    ("10 - 3 = 7", "7", 0.0, 1.0),
    ("5-3", "3", 0.0, 1.0),  # a hyphen after a digit is not a sign
    ("x = -3", "-3", 0.0, 1.0),
    ("#### 180", "180", 1.0, 1.0),  # 180 must not become 1.8E+2 anywhere
    ("#### 0", "0", 1.0, 1.0),
    ("#### -0", "0", 1.0, 1.0),
    ("#### 007", "7", 1.0, 1.0),
    ("#### answer", "18", 0.0, 0.0),
    ("no digits at all", "18", 0.0, 0.0),
    ("", "18", 0.0, 0.0),
    ("#### 12345678901234567890", "12345678901234567890", 1.0, 1.0),  # beyond float precision
    ("#### 12345678901234567891", "12345678901234567890", FMT, FMT),
]


@pytest.mark.parametrize("solution,gt,strict,lenient", GSM8K_CASES)
def test_gsm8k_case_table(solution, gt, strict, lenient):
    assert gsm8k_strict(solution, gt, format_score=FMT) == strict
    assert gsm8k_lenient(solution, gt, format_score=FMT) == lenient
    assert compute_score("openai/gsm8k", solution, gt, format_score=FMT) == strict
    assert compute_score("openai/gsm8k", solution, gt, method="lenient", format_score=FMT) == lenient
    assert compute_score("openai/gsm8k", solution, gt, method="flexible", format_score=FMT) == lenient


@pytest.mark.parametrize(
    "text,expected",
    [("18", "18"), ("18.0", "18"), ("18.", "18"), ("$18", "18"), ("18%", "18"), ("1,234", "1234"), (".5", "0.5"),
     ("-3", "-3"), ("-$3", "-3"), ("$-3", "-3"), ("\u22123", "-3"), (" 42 ", "42"), ("1e3", None), ("abc", None),
     ("", None), ("--3", None), ("1/2", None), (None, None), (18, None)],
)
def test_normalize_number(text, expected):
    value = normalize_number(text)
    assert (None if value is None else rewards._format_decimal(value)) == expected


BOXED_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{1+x^2}", "x^2+1", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", 1.0),
    ("\\boxed{3}", "4", FMT),  # well-formed, wrong
    ("\\boxed{3} then \\boxed{4}", "4", 1.0),  # the last box counts
    ("\\boxed{4} then \\boxed{3}", "4", FMT),
    ("\\fbox{4}", "4", 1.0),
    ("the answer is 4", "4", 0.0),  # no box
    ("\\boxed{}", "4", 0.0),  # empty box is not an answer
    ("\\boxed{4", "4", 0.0),  # unbalanced
    ("\\boxed{4}", "\\boxed{4}", 1.0),  # a ground truth stored boxed is unwrapped
    ("\\boxed{18}", "18", 1.0),
]


@pytest.mark.parametrize("solution,gt,expected", BOXED_CASES)
def test_boxed_case_table(solution, gt, expected):
    assert math_boxed(solution, gt, format_score=FMT) == expected
    assert compute_score("DigitalLearningGmbH/MATH-lighteval", solution, gt, format_score=FMT) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("\\boxed{a{b}c}", "a{b}c"), ("\\boxed{1} \\boxed{2}", "2"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
     ("\\boxed{\\{1\\}}", "\\{1\\}"), ("\\boxed {7}", "7"), ("$\\boxed 5$", "5"), ("\\boxed{1} \\boxed{2", "1"),
     ("\\boxed{", None), ("none", None), (None, None), ("\\fbox{x}", "x"), ("\\boxed{a\\\\b}", "a\\\\b")],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


# ---------------------------------------------------------------------------------------------- verl agreement


def _agreement_cases():
    """Integer answers in the '#### N' form verl's strict rule was written for: both must score identically."""
    cases = []
    for gt in [0, 7, 18, 72, 100, 1234, 98765, -3, -250]:
        g = str(gt)
        cases += [
            (f"Step 1...\n#### {g}", g),
            (f"#### {gt + 1}", g),
            (f"#### {g}\n", g),
            (f"#### {g} dollars", g),
            (f"#### {gt - 1}\nActually\n#### {g}", g),
            (f"#### {g}\nActually\n#### {gt + 5}", g),
            ("x" * 5000 + f"\n#### {g}", g),  # only the tail is read, by both
            (f"#### {g}\n" + "y" * 400, g),  # marker outside the 300-char tail: both see nothing
            (f"The answer is {g}", g),
            ("I don't know", g),
        ]
        if abs(gt) >= 1000:
            cases.append((f"#### {gt:,}", g))
    return cases


@pytest.mark.parametrize("solution,gt", _agreement_cases())
def test_strict_agrees_with_verl_gsm8k(solution, gt):
    from verl.utils.reward_score import gsm8k as verl_gsm8k

    ours = compute_score("openai/gsm8k", solution, gt, format_score=FMT)
    theirs = verl_gsm8k.compute_score(solution, gt, method="strict", format_score=FMT, score=1.0)
    assert ours == float(theirs)


# Where we deliberately differ from verl's string comparison: (solution, gt, ours, verl's)
DELIBERATE_DIFFERENCES = [
    ("#### 18.0", "18", 1.0, FMT),
    ("#### 18.", "18", 1.0, FMT),
    ("#### $18", "18", 1.0, 0.0),  # verl's regex wants a digit right after "#### "
    ("####18", "18", 1.0, 0.0),
    ("#### 18%", "18", 1.0, 1.0),  # same score, but verl ignores the % only because its regex stops there
    ("#### .5", "0.5", 1.0, FMT),
]


@pytest.mark.parametrize("solution,gt,ours,verls", DELIBERATE_DIFFERENCES)
def test_documented_differences_from_verl(solution, gt, ours, verls):
    from verl.utils.reward_score import gsm8k as verl_gsm8k

    assert compute_score("openai/gsm8k", solution, gt, format_score=FMT) == ours
    assert float(verl_gsm8k.compute_score(solution, gt, format_score=FMT)) == verls


def _gsm8k_dir() -> Path | None:
    env = os.environ.get("TINYLORA_VERL_GSM8K_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
    return path if (path / "test.jsonl").is_file() else None


def test_reference_answers_score_one_on_real_gsm8k():
    """Every GSM8K reference solution, fed back as a model response, is exactly right -- for us and for verl."""
    from verl.utils.reward_score import gsm8k as verl_gsm8k

    from tinylora_verl.tasks.data import extract_gsm8k_ground_truth

    directory = _gsm8k_dir()
    if directory is None:
        pytest.skip("no GSM8K JSONL (set TINYLORA_VERL_GSM8K_DIR)")
    rows = [json.loads(line) for line in (directory / "test.jsonl").open()]
    assert rows
    for row in rows:
        gt = extract_gsm8k_ground_truth(row["answer"])
        assert compute_score("openai/gsm8k", row["answer"], gt) == 1.0, row["answer"]
        assert verl_gsm8k.compute_score(row["answer"], gt) == 1.0
        assert compute_score("openai/gsm8k", row["answer"], str(int(gt) + 1), format_score=FMT) == FMT


# ---------------------------------------------------------------------------------------------- bad input


BAD_SOLUTIONS = [None, "", 18, 18.0, b"#### 18", ["#### 18"], {"a": 1}, object()]


@pytest.mark.parametrize("method", ["strict", "lenient", "boxed"])
@pytest.mark.parametrize("solution", BAD_SOLUTIONS, ids=lambda s: type(s).__name__ + repr(s)[:10])
def test_bad_solution_scores_zero(method, solution):
    assert compute_score("openai/gsm8k", solution, "18", method=method, format_score=FMT) == 0.0


@pytest.mark.parametrize("method", ["strict", "lenient", "boxed"])
@pytest.mark.parametrize("gt", [None, "", "   ", True, float("nan"), ["18"], "9" * 2000])
def test_bad_ground_truth_scores_zero(method, gt):
    assert compute_score("openai/gsm8k", "#### 18 \\boxed{18}", gt, method=method, format_score=FMT) == 0.0


@pytest.mark.parametrize("gt", [18, 18.0])
def test_numeric_ground_truth_is_accepted(gt):
    # A parquet column written by another tool may hold numbers; they are still ground truths.
    assert compute_score("openai/gsm8k", "#### 18", gt) == 1.0


@pytest.mark.parametrize("method", ["strict", "lenient", "boxed"])
def test_huge_strings_are_fast(method):
    huge = "1 " * 5_000_000 + "#### 18 \\boxed{18}"  # 10 MB of numbers
    start = time.perf_counter()
    assert compute_score("openai/gsm8k", huge, "18", method=method) == 1.0
    assert compute_score("openai/gsm8k", "{" * 10_000_000, "18", method=method) == 0.0
    assert time.perf_counter() - start < 2.0


def test_number_cut_by_the_tail_window_is_dropped():
    text = "123456" + "x" * 296  # 302 chars: the window starts inside 123456
    assert extract_gsm8k_answer(text, "lenient", tail_chars=300) is None
    assert extract_gsm8k_answer(text, "lenient", tail_chars=400) == "123456"


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs,match",
    [({"method": "exact"}, r"method='exact' is not supported; expected one of"),
     ({"format_score": "0.1"}, r"format_score='0.1' must be a finite number"),
     ({"score": float("inf")}, r"score=inf must be a finite number"),
     ({"tail_chars": 0}, r"tail_chars=0 must be a positive int"),
     ({"math_timeout": 0.5}, r"math_timeout=0.5 must be a positive int")],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_score("openai/gsm8k", "#### 18", "18", **kwargs)
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)


@pytest.mark.parametrize("data_source", ["unknown/dataset", None, 3])
def test_unknown_data_source_raises(data_source):
    with pytest.raises(ValueError, match=r"has no default reward; expected a GSM8K source"):
        compute_score(data_source, "#### 18", "18")
    assert compute_score(data_source, "#### 18", "18", method="strict") == 1.0  # an explicit method needs none


@pytest.mark.parametrize(
    "data_source,method",
    [("openai/gsm8k", "strict"), ("gsm8k", "strict"), ("my_gsm8k_subset", "strict"), ("math", "boxed"),
     ("lighteval/MATH", "boxed"), ("HuggingFaceH4/MATH-500", "boxed"), ("aime2024", "boxed")],
)
def test_resolve_method(data_source, method):
    assert resolve_method(data_source) == method


def test_score_and_format_score_are_configurable():
    assert compute_score("openai/gsm8k", "#### 18", "18", score=2.0) == 2.0
    assert compute_score("openai/gsm8k", "#### 17", "18") == 0.0  # default format_score is 0
    assert compute_score("openai/gsm8k", "#### 17", "18", format_score=-0.5) == -0.5


def test_return_dict_has_stable_keys_and_types():
    right = compute_score("openai/gsm8k", "#### 18", "18", return_dict=True)
    wrong = compute_score("openai/gsm8k", "#### 17", "18", format_score=FMT, return_dict=True)
    none = compute_score("openai/gsm8k", None, "18", return_dict=True)
    assert right == {"score": 1.0, "acc": 1.0, "pred": "18"}
    assert wrong == {"score": FMT, "acc": 0.0, "pred": "17"}
    assert none == {"score": 0.0, "acc": 0.0, "pred": ""}
    # acc tracks correctness, not the reward value, even if format_score == score
    assert compute_score("openai/gsm8k", "#### 17", "18", format_score=1.0, return_dict=True)["acc"] == 0.0


# ---------------------------------------------------------------------------------------------- verl integration


def test_signature_matches_verl_reward_loop_call():
    """verl 0.9.1's reward loop calls compute_score(data_source=, solution_str=, ground_truth=, extra_info=, ...)."""
    from verl.experimental.reward_loop.reward_manager import naive

    source = inspect.getsource(naive)
    for kw in ("data_source=data_source", "solution_str=response_str", "ground_truth=ground_truth",
               "extra_info=extra_info", "**extra_reward_kwargs"):
        assert kw in source
    params = inspect.signature(compute_score).parameters
    assert list(params)[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert compute_score(data_source="openai/gsm8k", solution_str="#### 18", ground_truth="18",
                         extra_info={"num_turns": None, "rollout_reward_scores": {}},
                         reward_router_address=None, reward_model_tokenizer=None) == 1.0


def test_loaded_through_verl_custom_reward_fn(tmp_path):
    """verl's get_custom_reward_fn loads our file and merges reward_kwargs into every call."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": rewards.__file__, "name": "compute_score",
        "reward_kwargs": {"format_score": FMT, "method": "strict"}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="openai/gsm8k", solution_str="#### 18", ground_truth="18", extra_info={}) == 1.0
    assert fn(data_source="openai/gsm8k", solution_str="#### 17", ground_truth="18", extra_info={}) == FMT


def test_boxed_runs_outside_the_main_thread():
    """verl calls reward functions from an executor thread, where math-verify's signal.alarm cannot be used."""
    results = {}

    def work():
        results["right"] = compute_score("math", "\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}")
        results["wrong"] = compute_score("math", "\\boxed{3}", "4", format_score=FMT)
        results["strict"] = compute_score("openai/gsm8k", "#### 18", "18")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results == {"right": 1.0, "wrong": FMT, "strict": 1.0}


def test_math_verify_still_refuses_threads_without_our_guard():
    """Guards the reason for the process pool: if math-verify stops needing it, this test says so."""
    from math_verify import parse

    errors = []

    def work():
        try:
            parse("$1$")
        except ValueError as e:
            errors.append(str(e))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors and "threaded environment" in errors[0]


def test_pathological_boxed_answer_times_out_to_format_score():
    start = time.perf_counter()
    assert compute_score("math", "\\boxed{5}", "10^{10^{10^{10}}}", format_score=FMT, math_timeout=1) == FMT
    assert time.perf_counter() - start < 30


def test_path_loaded_module_scores_boxed_from_a_thread():
    """verl loads the file by path under a synthetic module name; the worker pool must still find its function."""
    from verl.utils.import_utils import load_extern_object

    fn = load_extern_object(module_path=rewards.__file__, object_name="compute_score")
    assert fn.__module__ != "tinylora_verl.tasks.rewards"
    results = []
    thread = threading.Thread(target=lambda: results.append(fn("math", "\\boxed{0.5}", "\\frac{1}{2}")))
    thread.start()
    thread.join(timeout=120)
    assert results == [1.0]


def test_worker_pool_does_not_import_the_package_or_torch():
    """The pool runs math-verify from source, so a worker costs sympy, not tinylora_verl's torch import."""
    compute_score_in_thread = threading.Thread(target=lambda: compute_score("math", "\\boxed{1}", "1"))
    compute_score_in_thread.start()
    compute_score_in_thread.join(timeout=120)
    probe = "sorted(m for m in __import__('sys').modules if m.split('.')[0] in ('torch', 'tinylora_verl'))"
    assert rewards._get_pool().submit(eval, probe).result(timeout=60) == []
