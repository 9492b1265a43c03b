"""Tests for tinylora_verl.tasks.data: real GSM8K JSONL -> parquet, subsets, sources, MATH, errors, verl round trip."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from tinylora_verl.tasks import data
from tinylora_verl.tasks.data import (
    GSM8K_INSTRUCTION,
    GSM8K_SLICE_DIR,
    MATH_DATA_SOURCE,
    MATH_INSTRUCTION,
    Subset,
    build_parser,
    extract_gsm8k_ground_truth,
    main,
    prepare_gsm8k,
    prepare_math,
    read_jsonl,
)

COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]
QUIET = lambda msg: None


def _verl_ground_truth(answer: str) -> str:
    """verl's examples/data_preprocess/gsm8k.py extract_solution, verbatim in behaviour."""
    match = re.search("#### (\\-?[0-9\\.\\,]+)", answer)
    assert match is not None
    return match.group(0).split("#### ")[1].replace(",", "")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    env = os.environ.get("TINYLORA_VERL_GSM8K_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
    if not (path / "train.jsonl").is_file() or not (path / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K JSONL at {path} (set TINYLORA_VERL_GSM8K_DIR)")
    return path


@pytest.fixture
def no_default_sources(monkeypatch, tmp_path):
    """No env var and no sibling checkout, so the search falls through to the hub."""
    monkeypatch.delenv(data.GSM8K_ENV_VAR, raising=False)
    monkeypatch.setattr(data, "GSM8K_BESIDE_REPO_DIR", tmp_path / "absent")


def _read(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    assert list(df.columns) == COLUMNS
    return df


# ---------------------------------------------------------------------------------------------- GSM8K


def test_full_gsm8k_matches_verl_conventions(gsm8k_dir, tmp_path):
    paths = prepare_gsm8k(gsm8k_dir, tmp_path, log=QUIET)
    assert list(paths) == ["train", "test"]
    assert paths == {"train": tmp_path / "train.parquet", "test": tmp_path / "test.parquet"}
    for split in ("train", "test"):
        df = _read(paths[split])
        raw = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").open()]
        assert len(df) == len(raw)
        if gsm8k_dir == data.GSM8K_BESIDE_REPO_DIR:  # the full public release
            assert len(df) == {"train": 7473, "test": 1319}[split]
        for i in (0, 1, len(df) // 2, len(df) - 1):
            row = df.iloc[i]
            assert row["data_source"] == "openai/gsm8k"
            assert row["ability"] == "math"
            assert list(row["prompt"]) == [{"role": "user", "content": raw[i]["question"] + " " + GSM8K_INSTRUCTION}]
            assert row["reward_model"] == {"style": "rule", "ground_truth": _verl_ground_truth(raw[i]["answer"])}
            assert row["extra_info"] == {"split": split, "index": i, "answer": raw[i]["answer"],
                                         "question": raw[i]["question"]}
        # The ground truth of every row equals verl's own extraction.
        truths = [r["ground_truth"] for r in df["reward_model"]]
        assert truths == [_verl_ground_truth(r["answer"]) for r in raw]


def test_instruction_is_verls():
    assert GSM8K_INSTRUCTION == "Let's think step by step and output the final answer after \"####\"."


def test_limit_takes_the_first_rows(gsm8k_dir, tmp_path):
    paths = prepare_gsm8k(gsm8k_dir, tmp_path, splits=["test"], limit=10, log=QUIET)
    df = _read(paths["test"])
    assert list(paths) == ["test"]
    assert [e["index"] for e in df["extra_info"]] == list(range(10))


def test_seeded_subset_is_deterministic(gsm8k_dir, tmp_path):
    a = prepare_gsm8k(gsm8k_dir, tmp_path / "a", splits="train", limit=32, seed=7, log=QUIET)["train"]
    b = prepare_gsm8k(gsm8k_dir, tmp_path / "b", splits="train", limit=32, seed=7, log=QUIET)["train"]
    c = prepare_gsm8k(gsm8k_dir, tmp_path / "c", splits="train", limit=32, seed=8, log=QUIET)["train"]
    d = prepare_gsm8k(gsm8k_dir, tmp_path / "d", splits="train", limit=32, offset=32, seed=7, log=QUIET)["train"]
    idx = {k: [e["index"] for e in _read(p)["extra_info"]] for k, p in {"a": a, "b": b, "c": c, "d": d}.items()}
    assert idx["a"] == idx["b"]
    assert idx["a"] != idx["c"]
    assert not set(idx["a"]) & set(idx["d"])  # offset continues the same permutation
    assert idx["a"] != sorted(idx["a"])  # actually shuffled
    raw = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").open()]
    for extra in _read(a)["extra_info"]:  # index still points at the source row
        assert raw[extra["index"]]["question"] == extra["question"]


@pytest.mark.parametrize(
    "kwargs,n,expected",
    [({}, 5, [0, 1, 2, 3, 4]), ({"limit": 2}, 5, [0, 1]), ({"offset": 3}, 5, [3, 4]),
     ({"offset": 3, "limit": 10}, 5, [3, 4]), ({"limit": 5, "seed": 0}, 5, None)],
)
def test_subset_select(kwargs, n, expected):
    rows = [{"i": i} for i in range(n)]
    got = [i for i, _ in Subset(**kwargs).select(rows)]
    if expected is None:
        assert sorted(got) == list(range(n))
        assert got == [i for i, _ in Subset(**kwargs).select(rows)]
    else:
        assert got == expected


def test_subset_offset_at_the_end_is_refused_before_any_work():
    """An offset that leaves no rows (eval --offset N on N problems) fails at once, not after a merge and start-up."""
    with pytest.raises(ValueError, match=r"offset=5 is past the end of the 5 available rows \(allowed: 0 <= offset "
                                         r"< 5\)"):
        data.Subset(offset=5).select([{}] * 5)


def test_subset_does_not_touch_global_rng():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    Subset(seed=1).select([{}] * 100)
    assert random.random() == expected


# ---------------------------------------------------------------------------------------------- sources


def test_bundled_slice_is_the_first_256_rows(gsm8k_dir):
    total = sum(p.stat().st_size for p in GSM8K_SLICE_DIR.iterdir())
    assert total < 300_000
    assert (GSM8K_SLICE_DIR / "LICENSE").read_text() == (gsm8k_dir / "LICENSE").read_text()
    assert "MIT License" in (GSM8K_SLICE_DIR / "LICENSE").read_text()
    for split in ("train", "test"):
        sliced = (GSM8K_SLICE_DIR / f"{split}.jsonl").read_text().splitlines()
        full = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()
        assert len(sliced) == 256
        assert sliced == full[:256]


def test_slice_source(tmp_path):
    df = _read(prepare_gsm8k("slice", tmp_path, log=QUIET)["train"])
    assert len(df) == 256


def test_env_var_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(data.GSM8K_ENV_VAR, str(GSM8K_SLICE_DIR))
    assert data.resolve_gsm8k_dir(None) == GSM8K_SLICE_DIR
    assert len(_read(prepare_gsm8k(None, tmp_path, splits=["test"], log=QUIET)["test"])) == 256


def test_sibling_checkout_is_next(monkeypatch, gsm8k_dir):
    monkeypatch.delenv(data.GSM8K_ENV_VAR, raising=False)
    assert data.GSM8K_BESIDE_REPO_DIR == Path(data.__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
    if data.GSM8K_BESIDE_REPO_DIR.is_dir():
        assert data.resolve_gsm8k_dir(None) == data.GSM8K_BESIDE_REPO_DIR


def test_hub_is_last(monkeypatch, tmp_path, no_default_sources):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, {"question": "q", "answer": "#### 1,000"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    logs = []
    df = _read(prepare_gsm8k(None, tmp_path, splits=["test"], log=logs.append)["test"])
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [r["ground_truth"] for r in df["reward_model"]] == ["4", "1000"]
    assert any("from the hub" in line for line in logs) and any("wrote 2 rows" in line for line in logs)


def test_hub_failure_explains_the_alternatives(monkeypatch, tmp_path, no_default_sources):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"no local GSM8K found .*ConnectionError: no network.*'slice'"):
        prepare_gsm8k(None, tmp_path, log=QUIET)


def test_progress_is_printed(capsys, tmp_path):
    prepare_gsm8k("slice", tmp_path, splits=["test"], limit=3)
    out = capsys.readouterr().out
    assert "gsm8k/test: read 256 rows" in out and "gsm8k/test: wrote 3 rows" in out


# ---------------------------------------------------------------------------------------------- errors


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [({"splits": ["validation"]}, ValueError, r"splits=\['validation'\] are not GSM8K splits; expected a subset of"),
     ({"splits": []}, ValueError, r"splits is empty"),
     ({"limit": 0}, ValueError, r"limit=0 must be a positive int or None"),
     ({"limit": True}, ValueError, r"limit=True must be a positive int"),
     ({"offset": -1}, ValueError, r"offset=-1 must be an int >= 0"),
     ({"seed": "1"}, ValueError, r"seed='1' must be an int or None"),
     ({"offset": 300}, ValueError, r"offset=300 is past the end of the 256 available rows")],
)
def test_bad_gsm8k_options(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prepare_gsm8k("slice", tmp_path, log=QUIET, **kwargs)


def test_missing_source_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GSM8K source directory not found: '.*nowhere'"):
        prepare_gsm8k(tmp_path / "nowhere", tmp_path, log=QUIET)


def test_bad_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(data.GSM8K_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$TINYLORA_VERL_GSM8K_DIR='.*nowhere' is not a directory"):
        prepare_gsm8k(None, tmp_path, log=QUIET)


def test_missing_split_file(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(FileNotFoundError, match=r"JSONL file not found: '.*test.jsonl'"):
        prepare_gsm8k(tmp_path, tmp_path / "out", log=QUIET)


@pytest.mark.parametrize(
    "rows,match",
    [(["{not json"], r"train.jsonl:1: not valid JSON"),
     ([{"question": "q", "answer": "#### 1"}, "[1, 2]"], r"train.jsonl:2: expected a JSON object, got list"),
     ([{"question": "q"}], (r"train.jsonl:1: missing or non-string field\(s\) \['answer'\]; required fields "
                            r"are \['question', 'answer'\], found \['question'\]")),
     ([{"question": 3, "answer": "#### 1"}], r"missing or non-string field\(s\) \['question'\]"),
     ([{"question": "q", "answer": "the answer is 4"}], (r"gsm8k/train, row 0: GSM8K answer must be a string "
                                                         r"containing '#### <final answer>', got 'the answer is 4'")),
     ([{"question": "q", "answer": "4\n####   "}], r"row 0: GSM8K answer has nothing after '####'"),
     ([], r"train.jsonl: no rows")],
)
def test_bad_gsm8k_rows(tmp_path, rows, match):
    _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        prepare_gsm8k(tmp_path, tmp_path / "out", splits=["train"], log=QUIET)


@pytest.mark.parametrize(
    "answer,expected",
    [("x\n#### 72", "72"), ("#### 1,234", "1234"), ("#### -3", "-3"), ("a #### 1 \n#### 2", "2"), ("####5", "5")],
)
def test_extract_gsm8k_ground_truth(answer, expected):
    assert extract_gsm8k_ground_truth(answer) == expected


def test_extract_gsm8k_ground_truth_rejects_non_strings():
    with pytest.raises(ValueError, match=r"GSM8K answer must be a string containing '#### <final answer>', got None"):
        extract_gsm8k_ground_truth(None)


# ---------------------------------------------------------------------------------------------- MATH


MATH_ROWS = [
    {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Set?", "solution": "The set is $\\boxed{\\{1, 2\\}}$."},
    {"problem": "Two boxes?", "solution": "First \\boxed{3}, corrected: \\boxed{4}"},
    {"problem": "Nested?", "solution": "\\boxed{\\sqrt{\\frac{a^{2}}{b_{1}}}}"},
    {"problem": "Matrix?", "solution": "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}"},
    {"problem": "Spaced?", "solution": "so \\boxed 5."},
    {"problem": "Text?", "solution": "\\boxed{\\text{(C)}}", "level": "Level 1"},
]
MATH_TRUTHS = ["\\frac{1}{2}", "\\{1, 2\\}", "4", "\\sqrt{\\frac{a^{2}}{b_{1}}}",
               "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "5.", "\\text{(C)}"]


def test_prepare_math(tmp_path):
    src = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    df = _read(prepare_math(src, tmp_path / "out" / "math.parquet", log=QUIET))
    assert len(df) == len(MATH_ROWS)
    assert set(df["data_source"]) == {MATH_DATA_SOURCE}
    assert set(df["ability"]) == {"math"}
    assert [r["ground_truth"] for r in df["reward_model"]] == MATH_TRUTHS
    assert df.iloc[0]["prompt"][0]["content"] == (
        "Half of one?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert MATH_INSTRUCTION.endswith("\\boxed{}.")
    assert df.iloc[2]["extra_info"] == {"split": "test", "index": 2, "answer": MATH_ROWS[2]["solution"],
                                        "question": "Two boxes?"}


def test_math_data_source_is_routed_to_verls_boxed_scorer(tmp_path):
    """verl's default_compute_score must grade our MATH rows with its \\boxed{} scorer (0/1), like our reward."""
    from verl.utils.reward_score import default_compute_score

    from tinylora_verl.tasks.rewards import compute_score

    src = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS[:4])
    df = _read(prepare_math(src, tmp_path / "m.parquet", log=QUIET))
    for row in df.itertuples():
        gt = row.reward_model["ground_truth"]
        assert default_compute_score(row.data_source, f"so \\boxed{{{gt}}}", gt) == 1.0
        assert default_compute_score(row.data_source, "so \\boxed{999}", gt) == 0.0
        assert compute_score(row.data_source, f"so \\boxed{{{gt}}}", gt) == 1.0


def test_math_subset_and_data_source(tmp_path):
    src = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    df = _read(prepare_math(src, tmp_path / "m.parquet", split="train", limit=3, offset=1, seed=0,
                            data_source="math", log=QUIET))
    assert len(df) == 3 and set(df["data_source"]) == {"math"}
    assert {e["split"] for e in df["extra_info"]} == {"train"}


@pytest.mark.parametrize(
    "rows,match",
    [([{"problem": "p", "solution": "no box here"}], r"row 0: MATH solution has no non-empty, brace-balanced"),
     ([{"problem": "p", "solution": "\\boxed{}"}], r"row 0: MATH solution has no non-empty"),
     ([{"problem": "p", "solution": "\\boxed{1"}], r"row 0: MATH solution has no non-empty"),
     ([{"question": "p", "answer": "#### 1"}], r"missing or non-string field\(s\) \['problem', 'solution'\]")],
)
def test_bad_math_rows(tmp_path, rows, match):
    src = _write_jsonl(tmp_path / "math.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        prepare_math(src, tmp_path / "m.parquet", log=QUIET)


def test_bad_math_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"JSONL file not found: '.*missing.jsonl'"):
        prepare_math(tmp_path / "missing.jsonl", tmp_path / "m.parquet", log=QUIET)
    src = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    with pytest.raises(ValueError, match=r"data_source='' must be a non-empty string"):
        prepare_math(src, tmp_path / "m.parquet", data_source="", log=QUIET)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": "1"}\n\n   \n{"a": "2"}\n')
    assert read_jsonl(path, required=("a",)) == [{"a": "1"}, {"a": "2"}]


# ---------------------------------------------------------------------------------------------- CLI


def test_every_flag_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def test_cli_gsm8k_and_math(tmp_path, capsys):
    assert main(["gsm8k", "--src", "slice", "--out-dir", str(tmp_path / "g"), "--splits", "test", "--limit", "4",
                 "--seed", "3"]) == 0
    assert len(_read(tmp_path / "g" / "test.parquet")) == 4
    assert not (tmp_path / "g" / "train.parquet").exists()
    src = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    assert main(["math", "--jsonl", str(src), "--out", str(tmp_path / "m.parquet"), "--limit", "2"]) == 0
    assert len(_read(tmp_path / "m.parquet")) == 2
    assert "wrote 2 rows" in capsys.readouterr().out


def test_cli_rejects_bad_split(capsys):
    with pytest.raises(SystemExit):
        main(["gsm8k", "--out-dir", "x", "--splits", "validation"])
    assert "invalid choice: 'validation'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- verl round trip


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer with a chat template: enough for RLHFDataset's length filter, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for path in GSM8K_SLICE_DIR.glob("*.jsonl"):
        for line in path.open():
            words.update(json.loads(line)["question"].split())
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def test_parquet_loads_in_verl_rlhf_dataset(tmp_path, tiny_tokenizer):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset, normalize_token_ids

    path = prepare_gsm8k("slice", tmp_path, splits=["train"], limit=16, log=QUIET)["train"]
    config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 60, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(data_files=str(path), tokenizer=tiny_tokenizer, config=config)
    raw = pd.read_parquet(path)
    lengths = [len(normalize_token_ids(tiny_tokenizer.apply_chat_template(list(p), add_generation_prompt=True,
                                                                          tokenize=True)))
               for p in raw["prompt"]]
    # verl's own length filter ran on our prompt column: only rows that fit remain.
    assert 0 < len(dataset) == sum(n <= 60 for n in lengths) < 16
    item = dataset[0]
    assert item["data_source"] == "openai/gsm8k"
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["raw_prompt"][0]["content"].endswith(GSM8K_INSTRUCTION)
    assert item["reward_model"]["ground_truth"] == _verl_ground_truth(item["extra_info"]["answer"])
    assert item["index"] == item["extra_info"]["index"]


@pytest.mark.parametrize("style, needle", [("verl", 'output the final answer after "####".'),
                                           ("explicit", 'in the form "#### <number>", for example "#### 42".')])
def test_gsm8k_prompt_styles(style, needle):
    from tinylora_verl.tasks.data import gsm8k_record

    row = gsm8k_record("Q?", "so\n#### 7", "train", 0, prompt_style=style)
    assert row["prompt"][0]["content"].startswith("Q? ") and row["prompt"][0]["content"].endswith(needle)


def test_gsm8k_unknown_prompt_style():
    from tinylora_verl.tasks.data import gsm8k_record

    with pytest.raises(ValueError, match=r"prompt_style='fancy' is not supported; expected one of \['explicit', 'oneshot', 'verl'\]"):
        gsm8k_record("Q?", "#### 7", "train", 0, prompt_style="fancy")


def test_gsm8k_oneshot_prompt_is_a_worked_example_turn():
    from tinylora_verl.tasks.data import GSM8K_INSTRUCTION, gsm8k_record

    prompt = gsm8k_record("Q?", "#### 7", "train", 0, prompt_style="oneshot")["prompt"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[1]["content"].endswith("#### 42") and prompt[2]["content"] == "Q? " + GSM8K_INSTRUCTION


# ---------------------------------------------------------------------------------------------- SFT rows


def test_gsm8k_sft_rows_are_the_rl_prompt_then_the_solution(tmp_path, capsys):
    assert main(["gsm8k", "--src", "slice", "--out-dir", str(tmp_path), "--splits", "train", "--limit", "3",
                 "--prompt-style", "oneshot", "--sft"]) == 0
    assert "wrote 3 SFT rows" in capsys.readouterr().out
    sft = pd.read_parquet(tmp_path / "train.parquet")
    assert list(sft.columns) == ["messages", "data_source", "extra_info"]
    prepare_gsm8k("slice", tmp_path / "rl", splits="train", limit=3, prompt_style="oneshot", log=QUIET)
    rl = _read(tmp_path / "rl" / "train.parquet")
    for (_, s), (_, r) in zip(sft.iterrows(), rl.iterrows()):
        messages = list(s["messages"])
        assert [dict(m) for m in messages[:-1]] == [dict(m) for m in r["prompt"]]
        reply = messages[-1]
        answer = r["extra_info"]["answer"]
        assert reply["role"] == "assistant" and "<<" not in reply["content"] and "<<" in answer
        assert reply["content"] == re.sub(r"<<[^<>]*>>", "", answer)
        assert reply["content"].rsplit("####", 1)[1].strip().replace(",", "") == r["reward_model"]["ground_truth"]


def test_gsm8k_sft_rows_read_by_verls_sft_dataset(tmp_path, tiny_tokenizer):
    """verl's MultiTurnSFTDataset (what sft_trainer builds) reads the rows: the loss covers the solution only."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    prepare_gsm8k("slice", tmp_path, splits="train", limit=2, log=QUIET, sft=True)
    config = OmegaConf.create({"max_length": 1024, "truncation": "error", "messages_key": "messages",
                               "pad_mode": "no_padding"})
    ds = MultiTurnSFTDataset(parquet_files=str(tmp_path / "train.parquet"), tokenizer=tiny_tokenizer, config=config)
    item = ds[0]
    ids, mask = item["input_ids"], item["loss_mask"]
    # The word-level tokenizer knows the slice's question words only; the rest decodes as <unk>.
    learned = tiny_tokenizer.decode(ids[mask.bool()])
    assert learned.startswith("Natalia sold") and "72 clips altogether in April and May." in learned
    assert "How many" not in learned and "step by step" not in learned
