"""``tinylora_verl.tasks.problems``: the benchmark registry, local JSONL loading of all eight, and grading of rows
copied verbatim from Qwen2.5-Math's ``evaluation/data/{gaokao2023en,college_math}/test.jsonl``."""

import json

import pytest

from tinylora_verl.apps.cli import _benchmark_source
from tinylora_verl.tasks.problems import BENCHMARKS, PAPER_SUITE, get_spec, load_benchmark, parse_benchmarks
from tinylora_verl.tasks.rewards import compute_score

ALL = ["gsm8k", "math500", "minerva_math", "olympiadbench", "aime24", "amc23", "gaokao2023en", "college_math"]

# Lines of Qwen2.5-Math evaluation/data/gaokao2023en/test.jsonl, as stored (rows 40, 52, 92 and 8; 0-based). Two row
# shapes exist upstream: source/question/lang/answer and, with sourcename/id, the competition part.
GAOKAO_LINES = [
    r'{"source": "2023NationalBARTS_2023年全国乙卷-文科数学/10Q.en", "question": "Function $f(x)=\\sin(\\omega x + '
    r'\\varphi)$ is increasing on the interval $(\\frac{\\pi}{6}, \\frac{2\\pi}{3})$. And the points at $x=\\frac{\\pi}'
    r'{6}$ and $x=\\frac{2\\pi}{3}$ are vertices of $y=f(x)$. What is the value of $f(-\\frac{5\\pi}{12})?$", '
    r'"lang": "en", "answer": "$\\frac{\\sqrt{3}}{2}$"}',
    r'{"source": "2023NewNational1_2023年新课标全国I卷-数学/04Q.en", "question": "Function $f(x)=2^{x(x-a)}$ is '
    r'monotonically increasing on the interval $(0,1)$, what is the range of $a$?", "lang": "en", '
    r'"answer": "$[2,+\\infty)$"}',
    r'{"source": "part1.en_zh.json", "sourcename": "PurpleMeet2023", "question": "Find the sum of the four least '
    r'positive integers each of whose digits add to 12.", "id": "PurpleMeet2023_1", "lang": "en", "answer": "$210$"}',
    r'{"source": "2023BJ_2023年新高考北京卷-数学/14Q.en", "question": "There are 9 positive numbers in sequence '
    r'$\\{a_{n}\\}$, and they are in increasing order. The first 3 numbers form an arithmetic progression, and the '
    r'last 7 numbers form a geometric progression. Also, $a_{1}=1,a_{5}=12,a_{9}=192$. What is the value of $a_{7}$? '
    r'What is the sum of all the numbers in $\\{a_{n}\\}$?", "lang": "en", "answer": "$48$, $384$"}',
]
# Row 192: one of the two upstream rows whose answer is empty (it sits in the question text).
GAOKAO_UNANSWERED = (
    r'{"source": "part1.en_zh.json", "sourcename": "052023SATS4", "question": "There are 435 voting members of the US '
    r'House of Representatives. If b voting members are in favor of a certain bill, which expression represents the '
    r'percentage of the voting members in favor of the bill?(A) $100\\left(\\frac{b}{435}\\right)$(B) $100\\left('
    r'\\frac{435}{b}\\right)$(C) $435\\left(\\frac{b}{100}\\right)$(D) $435(100b)$Answer: A", "id": "052023SATS4_11", '
    r'"lang": "en", "answer": ""}')
# Lines of Qwen2.5-Math evaluation/data/college_math/test.jsonl (rows 1268, 1017, 192, 0 and 176; 0-based).
COLLEGE_LINES = [
    r'{"data_source": "college_math.PRECALCULUS", "question_number": "exercise.10.7.62", "question": "Solve the '
    r'equation: $6 \\operatorname{arccot}(2 x)-5 \\pi=0$", "answer": "$x=-\\frac{\\sqrt{3}}{2}$", "license": '
    r'"Creative Commons License", "data_topic": "college_math.precalculus"}',
    r'{"data_source": "college_math.PRECALCULUS", "question_number": "exercise.6.3.36", "question": "Solve the '
    r'inequality analytically: $2^{\\left(x^{3}-x\\right)}<1$", "answer": "$(-\\infty,-1) \\cup(0,1)$", "license": '
    r'"Creative Commons License", "data_topic": "college_math.precalculus"}',
    r'{"data_source": "college_math.Beginning_and_Intermediate_Algebra", "question_number": "exercise.0.3.23", '
    r'"question": "Solve: $\\frac{2^{3}+4}{-18-6+(-4)-[-5(-1)(-5)]}$", "answer": "-4", "license": "Creative Commons '
    r'Attribution 3.0 Unported License (CC BY 3.0)", "data_topic": "college_math.algebra"}',
    r'{"data_source": "college_math.Beginning_and_Intermediate_Algebra", "question_number": "exercise.0.4.61", '
    r'"question": "Simplify: $-10-4(n-5)$", "answer": "$10-4 n$", "license": "Creative Commons Attribution 3.0 '
    r'Unported License (CC BY 3.0)", "data_topic": "college_math.algebra"}',
    r'{"data_source": "college_math.Beginning_and_Intermediate_Algebra", "question_number": "exercise.7.8.24", '
    r'"question": "You are buying carpet to cover a room that measures $38 \\mathrm{ft}$ by $40 \\mathrm{ft}$. The '
    r'carpet cost $\\$ 18$ per square yard. How much will the carpet cost?", "answer": "$\\$ 3040$", "license": '
    r'"Creative Commons Attribution 3.0 Unported License (CC BY 3.0)", "data_topic": "college_math.algebra"}',
]

# One small row per benchmark in the format its registered source (or the Qwen2.5-Math copy) uses.
OTHER_ROWS = {
    "gsm8k": {"question": "Janet has 3 apples and buys 15 more. How many?", "answer": "3 + 15 = 18\n#### 18"},
    "math500": {"problem": "What is $1/2 + 1/4$?", "solution": "It is $\\boxed{\\frac34}$.", "answer": "\\frac34",
                "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    "minerva_math": {"problem": "Give $2^{10}$.", "solution": "So the answer is $\\boxed{1024}$.",
                     "type": "Introduction to Astronomy (8.282J Spring 2006)", "idx": 0},
    "olympiadbench": {"id": 1606, "question": "Find the least $n$.", "final_answer": ["$2$"],
                      "is_multiple_answer": False, "unit": None, "answer_type": "Numerical"},
    "aime24": {"id": 60, "problem": "Find the time.", "solution": "... so $204$.", "answer": "204", "year": 2024},
    "amc23": {"id": 0, "question": "How far from A do they meet?", "answer": 27.0},
}
EXPECTED_GT = {"gsm8k": "18", "math500": "\\frac34", "minerva_math": "1024", "olympiadbench": "2", "aime24": "204",
               "amc23": "27.0", "gaokao2023en": "\\frac{\\sqrt{3}}{2}", "college_math": "x=-\\frac{\\sqrt{3}}{2}"}


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def offline(monkeypatch):
    import datasets

    def no_hub(*a, **k):
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)


def test_registry_has_the_eight_benchmarks():
    assert sorted(BENCHMARKS) == sorted(ALL + ["arithmetic"])
    assert list(PAPER_SUITE) == ALL
    assert parse_benchmarks(",".join(ALL)) == ALL
    assert get_spec("gaokao2023en").hub_id == "MARIO-Math-Reasoning/Gaokao2023-Math-En"
    assert get_spec("gaokao2023en").split == "train"  # a single JSONL on the hub: datasets calls it "train"
    assert get_spec("college_math").hub_id == "di-zhang-fdu/College_Math_Test"
    assert get_spec("college_math").split == "test"
    assert {get_spec(n).data_source for n in ("gaokao2023en", "college_math")} == {"math"}


@pytest.mark.parametrize("layout", ["flat", "qwen"])
def test_all_benchmarks_load_from_a_local_folder(tmp_path, offline, layout):
    """``eval --data-dir``: ``<dir>/<name>.jsonl``, or Qwen2.5-Math's ``<dir>/<name>/test.jsonl`` (also for aime24
    and gaokao2023en, whose hub split is ``train``), with no network."""
    lines = {name: [json.dumps(row)] for name, row in OTHER_ROWS.items()}
    lines["gaokao2023en"], lines["college_math"] = GAOKAO_LINES, COLLEGE_LINES
    for name, rows in lines.items():
        _write(tmp_path / (f"{name}.jsonl" if layout == "flat" else f"{name}/test.jsonl"), rows)
    for name in ALL:
        problems = load_benchmark(name, _benchmark_source(name, {}, str(tmp_path)))
        assert len(problems) == len(lines[name]), name
        assert problems[0].ground_truth == EXPECTED_GT[name], name
        assert problems[0].data_source == get_spec(name).data_source
        assert problems[0].benchmark == name and problems[0].index == 0
    gaokao = load_benchmark("gaokao2023en", tmp_path / ("gaokao2023en.jsonl" if layout == "flat" else "gaokao2023en"))
    assert [p.ground_truth for p in gaokao] == ["\\frac{\\sqrt{3}}{2}", "[2,+\\infty)", "210", "48, 384"]
    assert gaokao[2].messages[0]["content"].startswith("Find the sum of the four least positive integers")
    assert gaokao[2].messages[0]["content"].endswith("put your final answer within \\boxed{}.")
    college = load_benchmark("college_math", _benchmark_source("college_math", {}, str(tmp_path)))
    # Unescaped $ delimiters go, an escaped \$ (a dollar amount) stays.
    assert [p.ground_truth for p in college] == ["x=-\\frac{\\sqrt{3}}{2}", "(-\\infty,-1) \\cup(0,1)", "-4",
                                                 "10-4 n", "\\$ 3040"]


def test_the_test_jsonl_fallback_needs_the_default_split(tmp_path, offline):
    _write(tmp_path / "aime24" / "test.jsonl", [json.dumps(OTHER_ROWS["aime24"])])
    assert load_benchmark("aime24", tmp_path / "aime24")[0].ground_truth == "204"
    with pytest.raises(FileNotFoundError, match=r"aime24: directory .* has neither validation.jsonl nor aime24.jsonl$"):
        load_benchmark("aime24", tmp_path / "aime24", split="validation")
    with pytest.raises(FileNotFoundError, match=r"gaokao2023en: directory .* has neither train.jsonl nor "
                                                r"gaokao2023en.jsonl nor test.jsonl"):
        load_benchmark("gaokao2023en", tmp_path)


def test_rows_with_an_empty_answer_are_left_out(tmp_path, offline):
    """Qwen2.5-Math's gaokao2023en has two rows with ``"answer": ""``: left out, the rest keep their index."""
    path = _write(tmp_path / "gaokao2023en.jsonl", [GAOKAO_LINES[0], GAOKAO_UNANSWERED, GAOKAO_LINES[2]])
    problems = load_benchmark("gaokao2023en", path)
    assert [(p.index, p.ground_truth) for p in problems] == [(0, "\\frac{\\sqrt{3}}{2}"), (2, "210")]
    assert [p.index for p in load_benchmark("gaokao2023en", path, offset=1)] == [2]
    with pytest.raises(ValueError, match=r"offset=2 is past the end of the 2 available rows"):
        load_benchmark("gaokao2023en", path, offset=2)
    # A row without any answer field is still a malformed file, not a skipped row.
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "x?", "lang": "en"})])
    with pytest.raises(ValueError, match=r"college_math row 0: needs one of \['problem'.*found fields \['lang', "
                                         r"'question'\]"):
        load_benchmark("college_math", bad)


# (benchmark, upstream line, a correct final answer as a model might write it, a wrong one)
GRADED = [
    ("gaokao2023en", GAOKAO_LINES[0], "\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}"),
    ("gaokao2023en", GAOKAO_LINES[0], "\\dfrac{\\sqrt3}{2}", "-\\frac{\\sqrt{3}}{2}"),
    ("gaokao2023en", GAOKAO_LINES[1], "[2,+\\infty)", "(2,+\\infty)"),
    ("gaokao2023en", GAOKAO_LINES[1], "[2, \\infty)", "[2, 3]"),
    ("gaokao2023en", GAOKAO_LINES[2], "210", "201"),
    ("college_math", COLLEGE_LINES[0], "x=-\\frac{\\sqrt{3}}{2}", "x=\\frac{\\sqrt{3}}{2}"),
    ("college_math", COLLEGE_LINES[0], "-\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("college_math", COLLEGE_LINES[1], "(-\\infty,-1) \\cup (0,1)", "(-\\infty,-1] \\cup [0,1]"),
    ("college_math", COLLEGE_LINES[2], "-4", "4"),
    ("college_math", COLLEGE_LINES[2], "-4.0", "-3"),
    ("college_math", COLLEGE_LINES[3], "10-4n", "10+4n"),
]


@pytest.mark.parametrize("name,line,right,wrong", GRADED)
def test_upstream_rows_are_graded_by_the_boxed_rule(tmp_path, offline, name, line, right, wrong):
    (problem,) = load_benchmark(name, _write(tmp_path / f"{name}.jsonl", [line]))
    assert problem.data_source == "math"

    def score(answer):
        return compute_score(problem.data_source, f"Working it through, the answer is $\\boxed{{{answer}}}$.",
                             problem.ground_truth)

    assert score(right) == 1.0
    assert score(wrong) == 0.0
    assert compute_score(problem.data_source, f"The answer is {right}.", problem.ground_truth) == 0.0  # not boxed


# ---------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_loads_the_rows_it_was_trained_on(tmp_path):
    """The CPU study's task: eval reads the RL parquet `data arithmetic` wrote, so its prompt (with the task's
    one-shot example) and ground truth are the training rows' own, graded by the `####` rule."""
    import pandas as pd

    from tinylora_verl.apps.eval import score_response
    from tinylora_verl.tasks.data import prepare_arithmetic

    prepare_arithmetic("add2", tmp_path, seed=3, train_size=8, test_size=6, log=lambda _: None)
    problems = load_benchmark("arithmetic", str(tmp_path), limit=4)
    rows = pd.read_parquet(tmp_path / "test.parquet").to_dict(orient="records")
    assert len(problems) == 4
    for p, row in zip(problems, rows):
        assert p.messages == [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        assert p.ground_truth == row["reward_model"]["ground_truth"] and p.data_source == "tinylora/arithmetic"
        assert len(p.messages) == 3  # the worked example (user, assistant), then the question
        assert score_response(p, f"... = {p.ground_truth}.\n#### {p.ground_truth}")["correct"]
        assert not score_response(p, f"#### {int(p.ground_truth) + 1}")["correct"]
        assert not score_response(p, f"\\boxed{{{p.ground_truth}}}")["correct"]  # not the boxed rule
    # A single .parquet file works too, and the train split by name.
    assert len(load_benchmark("arithmetic", str(tmp_path / "test.parquet"))) == 6
    assert len(load_benchmark("arithmetic", str(tmp_path), split="train")) == 8


def test_arithmetic_needs_local_files(tmp_path):
    with pytest.raises(ValueError, match=r"arithmetic has no hub copy: write it with `tinylora-verl data arithmetic"):
        load_benchmark("arithmetic")
    with pytest.raises(FileNotFoundError, match=r"arithmetic: '.*/test.parquet' not found"):
        load_benchmark("arithmetic", str(tmp_path))
    with pytest.raises(ValueError, match=r"prompt_style='oneshot' does not apply to verl parquet rows"):
        load_benchmark("arithmetic", str(tmp_path), prompt_style="oneshot")
    import pandas as pd

    pd.DataFrame([{"question": "1+1", "answer": "2"}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"arithmetic row 0: not a verl RL row"):
        load_benchmark("arithmetic", str(tmp_path / "bad.parquet"))
