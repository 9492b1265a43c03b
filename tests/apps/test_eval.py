"""``tinylora-verl eval`` and ``plot``: scoring, aggregation, files, benchmarks, merged/LoRA engines, curves.

Unit tests inject a fake generation backend; the ``slow`` tests run SmolLM2-135M-Instruct on vLLM CPU.
"""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from tests.core.test_adapter import randomize_
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.tasks.problems import Problem, load_benchmark, parse_benchmarks
from tinylora_verl.apps.cli import main
from tinylora_verl.tasks.data import GSM8K_SLICE_DIR
from tinylora_verl.apps.eval import (
    Decoding,
    aggregate,
    default_decodings,
    evaluate,
    resolve_modes,
    run_eval,
    score_response,
)
from tinylora_verl.apps.export import export
from tinylora_verl.apps.metrics import find_metrics_file
from tinylora_verl.apps.plots import load_metrics, plot_metrics
from tinylora_verl.verl.generation import lora_rank_for

SHARED_GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def gsm(index, gt="18"):
    return Problem("gsm8k", index, [{"role": "user", "content": f"q{index}"}], gt, "openai/gsm8k")


def math_problem(index, gt="\\frac{1}{2}"):
    return Problem("math500", index, [{"role": "user", "content": f"p{index}"}], gt, "HuggingFaceH4/MATH-500")


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("response, correct, lenient, formatted, reward", [
    ("3 * 6 = 18\n#### 18", True, True, True, 1.0),
    ("so 17\n#### 17", False, False, True, 0.1),
    ("The answer is 18.", False, True, False, 0.0),
    ("", False, False, False, 0.0),
])
def test_score_gsm8k(response, correct, lenient, formatted, reward):
    row = score_response(gsm(0), response)
    assert (row["correct"], row["correct_lenient"], row["formatted"], row["reward"]) == (correct, lenient, formatted,
                                                                                          reward)


@pytest.mark.parametrize("response, correct, formatted, reward", [
    ("so $\\boxed{0.5}$", True, True, 1.0),
    ("so \\boxed{3}", False, True, 0.1),
    ("one half", False, False, 0.0),
])
def test_score_math(response, correct, formatted, reward):
    row = score_response(math_problem(0), response)
    assert (row["correct"], row["formatted"], row["reward"], row["correct_lenient"]) == (correct, formatted, reward,
                                                                                          None)


def test_aggregate_groups():
    def r(index, correct, formatted, reward, tok=10):
        return {"index": index, "correct": correct, "correct_lenient": correct, "formatted": formatted,
                "reward": reward, "num_tokens": tok, "response": "x" * tok}

    rows = [r(0, True, True, 1.0), r(0, False, True, 0.1), r(1, False, False, 0.0), r(1, False, False, 0.0),
            r(2, False, True, 0.1), r(2, False, False, 0.0)]
    agg = aggregate(rows)
    assert agg["problems"] == 3 and agg["responses"] == 6
    assert agg["acc"] == pytest.approx(1 / 6) and agg["pass_at_k"] == pytest.approx(1 / 3)
    assert agg["format_rate"] == pytest.approx(3 / 6)
    assert agg["mixed_format"] == pytest.approx(1 / 3)  # only problem 2 mixes formatted and unformatted
    assert agg["mixed_reward"] == pytest.approx(2 / 3)  # problems 0 and 2: a GRPO group with non-zero advantage
    assert agg["mean_reward"] == pytest.approx(1.2 / 6) and agg["mean_response_tokens"] == 10


# ---------------------------------------------------------------------------------------------- evaluate


def fake_backend(answers):
    """Greedy answers ``answers[i]``; sample k of problem i answers ``answers[i] + k``; records the calls."""
    calls = []

    def generate(messages_list, decoding):
        calls.append((len(messages_list), decoding))
        out = []
        for m in messages_list:
            i = int(re.sub(r"\D", "", m[-1]["content"]))
            if m[-1]["content"].startswith("p"):
                out.append([(f"\\boxed{{{answers[i] + k}}}", 5) for k in range(decoding.n)])
            else:
                out.append([(f"#### {answers[i] + k}", 3) for k in range(decoding.n)])
        return out

    generate.calls = calls
    return generate


def test_evaluate_writes_files(tmp_path):
    problems = [gsm(0), gsm(1), math_problem(0, "7"), math_problem(1, "8")]
    answers = [18, 19]  # gsm: 0 right, 1 wrong; math: "7"/"8" vs 18/19 wrong, sample 1 of nothing right
    decodings = default_decodings(samples=2, temperature=1.0, max_tokens=32)
    backends = {"base": fake_backend(answers), "merged": fake_backend([17, 18])}
    rows = evaluate(problems, backends, decodings, tmp_path, meta={"model": "fake"}, progress=False)
    assert [(r["benchmark"], r["mode"], r["decoding"]) for r in rows] == [
        (b, m, d) for m in ("base", "merged") for d in ("greedy", "t1_n2") for b in ("gsm8k", "math500")]
    by = {(r["benchmark"], r["mode"], r["decoding"]): r for r in rows}
    assert by["gsm8k", "base", "greedy"]["acc"] == 0.5 and by["gsm8k", "base", "greedy"]["format_rate"] == 1.0
    # base samples: problem 0 -> 18, 19; problem 1 -> 19, 20; gt 18 for both.
    assert by["gsm8k", "base", "t1_n2"]["acc"] == 0.25 and by["gsm8k", "base", "t1_n2"]["pass_at_k"] == 0.5
    assert by["gsm8k", "merged", "t1_n2"]["acc"] == 0.5  # 17, 18 | 18, 19
    assert by["math500", "base", "greedy"]["mean_reward"] == pytest.approx(0.1)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (4 * 1 + 4 * 2)
    s = samples[0]
    assert {"benchmark", "index", "prompt", "response", "pred", "pred_lenient", "correct", "correct_lenient",
            "formatted", "reward", "mode", "decoding", "sample", "num_tokens"} <= set(s)
    assert s["prompt"] == [{"role": "user", "content": "q0"}] and s["pred"] == "18" and s["correct"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"] == {"model": "fake"} and len(summary["rows"]) == 8
    # 2 problems: the interval is the bootstrap's range over them; merged vs base on the same problems
    g = by["gsm8k", "base", "greedy"]
    assert (g["acc_low"], g["acc_high"]) == (0.0, 1.0)
    paired = {(p["benchmark"], p["decoding"]): p for p in summary["paired"]}
    assert set(paired) == {(b, d) for b in ("gsm8k", "math500") for d in ("greedy", "t1_n2")}
    gp = paired["gsm8k", "greedy"]  # gt 18: base 18 | 19 -> right, wrong; merged 17 | 18 -> wrong, right
    assert (gp["mode"], gp["reference"], gp["diff"], gp["n01"], gp["n10"], gp["p_mcnemar"]) == (
        "merged", "base", 0.0, 1, 1, 1.0)
    assert paired["gsm8k", "t1_n2"]["p_mcnemar"] is None and paired["gsm8k", "t1_n2"]["diff"] == 0.25
    assert len(list(csv.DictReader(open(tmp_path / "paired.csv")))) == 4
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[0]["benchmark"] == "gsm8k" and float(table[0]["acc"]) == 0.5
    calls = [(c[0], c[1].n, c[1].temperature) for c in backends["base"].calls]
    assert calls == [(2, 1, 0.0), (2, 1, 0.0), (2, 2, 1.0), (2, 2, 1.0)]  # one call per benchmark x decoding


def test_evaluate_errors(tmp_path):
    dec = [Decoding("greedy")]
    with pytest.raises(ValueError, match="no problems to evaluate"):
        evaluate([], {"base": fake_backend([1])}, dec, tmp_path)
    with pytest.raises(ValueError, match="no generation backends"):
        evaluate([gsm(0)], {}, dec, tmp_path)
    with pytest.raises(RuntimeError, match=r"backend 'base' returned \[0\]\.\.\. responses for 1 prompts; expected 1"):
        evaluate([gsm(0)], {"base": lambda msgs, d: [[]]}, dec, tmp_path, progress=False)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(n=0), r"n=0 must be an int >= 1"),
    (dict(temperature=-1.0), r"temperature=-1.0 must be >= 0"),
    (dict(n=4, temperature=0.0), r"n=4 greedy samples would all be identical"),
    (dict(max_tokens=0), r"max_tokens=0 must be an int >= 1"),
])
def test_decoding_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Decoding("d", **kwargs)


def test_modes_and_lora_rank():
    assert resolve_modes("auto", has_adapter=False) == ["base"]
    assert resolve_modes("auto", True, fidelity=0.5) == ["merged", "lora"]
    assert resolve_modes("auto", True, fidelity=0.999) == ["merged"]
    assert resolve_modes("both", True) == ["merged", "lora"] and resolve_modes("lora", True) == ["lora"]
    with pytest.raises(ValueError, match=r"--mode 'fused' is not supported; expected one of \('merged'"):
        resolve_modes("fused", True)
    with pytest.raises(ValueError, match="--mode auto needs the merge fidelity"):
        resolve_modes("auto", True)
    # vLLM only accepts a fixed set of max_lora_rank values: a rank-2 LoRA gets rank-8 slots.
    assert (lora_rank_for(1), lora_rank_for(2), lora_rank_for(9)) == (1, 8, 16)
    with pytest.raises(ValueError, match=r"LoRA rank 600 exceeds vLLM's largest max_lora_rank; allowed values"):
        lora_rank_for(600)


# ---------------------------------------------------------------------------------------------- benchmarks


def test_load_gsm8k_slice():
    probs = load_benchmark("gsm8k", GSM8K_SLICE_DIR, limit=3, offset=2)
    assert [p.index for p in probs] == [2, 3, 4]
    assert probs[0].messages[0]["content"].endswith('output the final answer after "####".')
    assert probs[0].ground_truth == "70000" and probs[0].data_source == "openai/gsm8k"


def test_load_gsm8k_prompt_style_matches_training_records():
    from tinylora_verl.tasks.data import GSM8K_ONESHOT_TURNS, gsm8k_record

    probs = load_benchmark("gsm8k", GSM8K_SLICE_DIR, limit=2, prompt_style="oneshot")
    assert probs[0].messages[: len(GSM8K_ONESHOT_TURNS)] == GSM8K_ONESHOT_TURNS
    row = load_benchmark("gsm8k", GSM8K_SLICE_DIR, limit=1, prompt_style="explicit")[0]
    assert row.messages == gsm8k_record("q", "#### 1", "test", 0, "explicit")["prompt"][:-1] + [row.messages[-1]]
    assert row.messages[-1]["content"].endswith(gsm8k_record("q", "#### 1", "test", 0, "explicit")["prompt"][-1]
                                                ["content"][2:])
    with pytest.raises(ValueError, match=r"prompt_style='fewshot' is not supported; expected one of \['explicit'"):
        load_benchmark("gsm8k", GSM8K_SLICE_DIR, prompt_style="fewshot")


def test_load_math_jsonl(tmp_path):
    rows = [{"problem": "1/2?", "answer": "$\\frac12$"}, {"problem": "2+2?", "solution": "so \\boxed{4}."},
            {"question": "x?", "final_answer": ["$3$"]}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    probs = load_benchmark("math500", path)
    assert [p.ground_truth for p in probs] == ["\\frac12", "4", "3"]
    assert probs[0].messages[0]["content"].endswith("put your final answer within \\boxed{}.")
    assert probs[2].data_source == "HuggingFaceH4/MATH-500" and load_benchmark("olympiadbench", path)[0].data_source \
        == "math"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": "x"}))
    with pytest.raises(ValueError, match=r"prompt_style='oneshot' applies to gsm8k only; 'math500'"):
        load_benchmark("math500", path, prompt_style="oneshot")
    with pytest.raises(ValueError, match=r"math500 row 0: needs one of \['problem'.*found fields \['problem'\]"):
        load_benchmark("math500", tmp_path / "bad.jsonl")


def test_benchmark_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown benchmark 'gsm9k'; known benchmarks are \['aime24'"):
        parse_benchmarks("gsm8k,gsm9k")
    with pytest.raises(ValueError, match="names no benchmark"):
        parse_benchmarks(" , ")
    with pytest.raises(ValueError, match="lists a benchmark twice"):
        parse_benchmarks("gsm8k,gsm8k")
    with pytest.raises(FileNotFoundError, match=r"amc23: directory .* has neither test.jsonl nor amc23.jsonl"):
        load_benchmark("amc23", tmp_path)
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"aime24: loading hub dataset 'HuggingFaceH4/aime_2024' \(split 'train'\) "
                                           r"failed \(ConnectionError: no network\)"):
        load_benchmark("aime24")


# ---------------------------------------------------------------------------------------------- run_eval


@pytest.fixture
def tiny_run(tiny_trained):
    return tiny_trained


def test_write_merged_model(tiny_run):
    from safetensors.torch import load_file

    tmp, _, adapter = tiny_run
    done = export(str(tmp / "base"), str(tmp / "adapter.safetensors"), merged_out=str(tmp / "merged"),
                  shard_bytes=20_000, progress=False)
    out, fidelity = done.merged, done.fidelity
    assert fidelity == pytest.approx(adapter.merge_fidelity(torch.bfloat16)[0])
    expected = dict(adapter.merged_named_tensors(dtype=torch.bfloat16))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)  # several shards, every tensor once
    got = {}
    for shard in set(index.values()):
        got.update(load_file(str(out / shard)))
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()


def test_zero_adapter_control_serves_the_base_through_the_adapters_path(tiny_run, tmp_path):
    """``zero_v``: the merged folder holds cast(W) exactly (the base's weights through the merge path), the LoRA
    folder zero B factors (the base through vLLM's LoRA kernels)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, _, _ = tiny_run
    done = export(str(tmp / "base"), str(tmp / "adapter.safetensors"), merged_out=str(tmp_path / "m0"),
                  lora_out=str(tmp_path / "l0"), progress=False, zero_v=True)
    base = AutoModelForCausalLM.from_pretrained(str(tmp / "base"), dtype=torch.float32).state_dict()
    merged = load_file(str(done.merged / "model.safetensors"))
    assert merged and all(torch.equal(t, base[name].to(torch.bfloat16)) for name, t in merged.items())
    lora = load_file(str(done.lora / "adapter_model.safetensors"))
    b = [t for name, t in lora.items() if "lora_B" in name]
    assert b and all(not t.any() for t in b)


def test_run_eval_modes(tiny_run, tmp_path):
    tmp, _, _ = tiny_run
    started = []

    def factory(model_dir, max_model_len, seed, lora_dir=None, lora_rank=None):
        started.append({"model_dir": model_dir, "lora_dir": lora_dir, "lora_rank": lora_rank,
                        "files": sorted(p.name for p in Path(lora_dir or model_dir).iterdir())})
        return fake_backend([18, 18])

    rows = run_eval(str(tmp / "base"), [gsm(0), gsm(1)], [Decoding("greedy")], str(tmp_path / "out"),
                    adapter=str(tmp / "adapter.safetensors"), mode="both", with_base=True, backend_factory=factory)
    assert [r["mode"] for r in rows] == ["base", "merged", "lora", "merged_v0", "lora_v0"]
    assert started[0]["model_dir"] == str(tmp / "base") and "model.safetensors" in started[1]["files"]
    assert started[2]["files"] == ["adapter_config.json", "adapter_model.safetensors"] and started[2]["lora_rank"] == 2
    assert started[3]["files"] == started[1]["files"] and started[4]["files"] == started[2]["files"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["meta"]["merge_fidelity_bf16"] == rows[1]["merge_fidelity_bf16"] > 0
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 10
    # the engines ran one at a time; the pairs are formed from the combined samples: every mode against the base,
    # then each adapter mode against its zero-adapter control
    assert [(p["mode"], p["reference"], p["diff"]) for p in summary["paired"]] == [
        ("merged", "base", 0.0), ("lora", "base", 0.0), ("merged_v0", "base", 0.0), ("lora_v0", "base", 0.0),
        ("merged", "merged_v0", 0.0), ("lora", "lora_v0", 0.0)]
    with pytest.raises(ValueError, match=r"--mode 'x' is not supported"):
        run_eval(str(tmp / "base"), [gsm(0)], [Decoding("greedy")], str(tmp_path / "o2"), mode="x",
                 backend_factory=factory)


def test_cli_eval(tiny_run, tmp_path, monkeypatch, capsys):
    import tinylora_verl.apps.eval as ev

    tmp, _, _ = tiny_run
    real = ev.run_eval
    monkeypatch.setattr(ev, "run_eval", lambda *a, **k: real(*a, **k, backend_factory=lambda **kw: fake_backend(
        list(range(300)))))
    argv = ["eval", "--model", str(tmp / "base"), "--benchmarks", "gsm8k", "--data", f"gsm8k={GSM8K_SLICE_DIR}",
            "--limit", "2", "--samples", "2", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gsm8k\tbase\tgreedy\t2" in out and "gsm8k\tbase\tt1_n2\t2" in out
    assert "acc_low\tacc_high" in out and "against the base" not in out  # no adapter: nothing to pair
    assert (tmp_path / "cli" / "summary.csv").is_file()
    for extra, msg in [(["--data", "gsm8k"], r"--data 'gsm8k' must look like NAME=PATH_OR_HUB_ID"),
                       (["--data", "math500=x.jsonl"], r"names 'math500', which is not in --benchmarks \['gsm8k'\]"),
                       (["--data-dir", str(tmp_path)], r"--data-dir .* has neither gsm8k.jsonl nor a gsm8k/ dir")]:
        argv = ["eval", "--model", str(tmp / "base"), "--benchmarks", "gsm8k", *extra]
        assert main(argv) == 2
        assert re.search(msg, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- plots


def write_metrics(path: Path, steps=20, u=13):
    gen = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for s in range(1, steps + 1):
            data = {"critic/score/mean": 0.05 + 0.01 * s, "critic/rewards/mean": 0.04 + 0.01 * s,
                    "rollout_corr/kl": 1e-3 / s, "training/rollout_probs_diff_mean": 2e-3, "actor/tinylora/v_norm": 0.01 * s,
                    "response_length/mean": 200.0, "perf/throughput": "n/a"}
            data |= {f"actor/tinylora/v_{i}": float(0.001 * s * torch.randn((), generator=gen)) for i in range(u)}
            if s % 5 == 0:
                data["val-core/openai/gsm8k/acc/mean@1"] = 0.01 * s
                data["val-core/openai/gsm8k/reward/mean@1"] = 0.02 * s
            f.write(json.dumps({"step": s, "data": data}) + "\n")
        f.write('{"step": 21, "data": {"critic/sc')  # a running job's half-written line


def test_plot_metrics(tmp_path):
    path = tmp_path / "run" / "exp.jsonl"
    path.parent.mkdir()
    write_metrics(path)
    series = load_metrics(path)
    assert len(series["critic/score/mean"]) == 20 and "perf/throughput" not in series
    assert series["val-core/openai/gsm8k/acc/mean@1"][0] == (5, 0.05)
    assert find_metrics_file(tmp_path / "run") == path
    png = plot_metrics(tmp_path / "run")
    assert png == path.with_suffix(".png") and png.stat().st_size > 20_000
    assert main(["plot", str(path), "--out", str(tmp_path / "c.png")]) == 0 and (tmp_path / "c.png").is_file()


def test_plot_missing_panels_and_errors(tmp_path, capsys):
    only_reward = tmp_path / "r.jsonl"
    only_reward.write_text(json.dumps({"step": 1, "data": {"critic/score/mean": 0.1}}) + "\n")
    assert plot_metrics(only_reward).is_file()  # empty panels say "no ... metrics" instead of failing
    with pytest.raises(FileNotFoundError, match="is neither a JSONL file nor a folder"):
        plot_metrics(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(FileNotFoundError, match=r"no verl file-logger JSONL .* looked at 1 .jsonl files"):
        plot_metrics(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"x.jsonl: no lines of the form"):
        plot_metrics(tmp_path / "empty" / "x.jsonl")
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "tinylora-verl plot: error: metrics source" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real vLLM


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_path, tmp_path_factory):
    """An adapter file for SmolLM2 with v large enough (std 0.5) to change greedy outputs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32)
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=13))
    randomize_(adapter, std=0.5, seed=1)
    path = tmp_path_factory.mktemp("smol") / "adapter.safetensors"
    adapter.save_adapter(str(path))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(), reason="needs the shared GSM8K test split")
def test_vllm_eval_base_merged_lora(smollm2_path, smollm2_adapter, tmp_path):
    problems = load_benchmark("gsm8k", SHARED_GSM8K, limit=8)
    decodings = default_decodings(samples=2, temperature=1.0, max_tokens=64)
    rows = run_eval(str(smollm2_path), problems, decodings, str(tmp_path), adapter=str(smollm2_adapter),
                    mode="both", with_base=True, max_model_len=1024)
    modes = ("base", "merged", "lora", "merged_v0", "lora_v0")
    assert [(r["mode"], r["decoding"]) for r in rows] == [(m, d) for m in modes for d in ("greedy", "t1_n2")]
    assert all(r["problems"] == 8 for r in rows) and rows[0]["responses"] == 8 and rows[1]["responses"] == 16
    assert rows[2]["merge_fidelity_bf16"] > 0.99
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 * (8 + 16)
    greedy = {m: [s["response"] for s in samples if s["mode"] == m and s["decoding"] == "greedy"] for m in modes}
    # The merged control is the base's own bf16 weights through the merge path: the same engine, the same text.
    assert greedy["merged_v0"] == greedy["base"]
    paired = {(p["mode"], p["reference"], p["decoding"]) for p in json.loads((tmp_path / "summary.json").read_text())[
        "paired"]}
    assert {("merged", "base", "greedy"), ("lora_v0", "base", "greedy"), ("lora", "lora_v0", "t1_n2")} <= paired
    print("lora_v0 greedy texts equal to the base's:", sum(a == b for a, b in zip(greedy["lora_v0"], greedy["base"])))
    differ = sum(a != b for a, b in zip(greedy["base"], greedy["merged"]))
    assert differ >= 6, greedy  # v ~ 0.5 moves the top singular directions a lot
    # merged (bf16 weights) and lora (bf16 LoRA kernels) are two roundings of the same ΔW, so greedy text stays
    # together for a while and may then part (whole-text equality was 2/8 to 6/8 across SVD round-off changes).
    # Served the base instead, lora could never share more of merged's text than the base does.
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    closer = sum(prefix(m, lo) > prefix(m, b) for b, m, lo in zip(greedy["base"], greedy["merged"], greedy["lora"]))
    same = sum(a == b for a, b in zip(greedy["merged"], greedy["lora"]))
    print(f"greedy base!=merged on {differ}/8, merged==lora on {same}/8, lora closer to merged than base on {closer}/8")
    assert closer >= 6
    assert (tmp_path / "summary.csv").is_file() and json.loads((tmp_path / "summary.json").read_text())["meta"]


# vLLM (bf16 weights and kernels) vs transformers float32 with forward hooks, 73 tokens of a chat + answer.
# Measured on this machine (SmolLM2, v std 0.5): base |Δ| max 0.486 / mean 0.035; merged vs hooked |Δ| max 0.686 /
# mean 0.088, against an adapter effect of max 8.79 / mean 2.37. The merged error is ~2x the base's because this v
# pushes the model far off its trained regime, where bf16 rounding matters more. Bounds: ~1.5x the measurement.
LOGPROB_MAX_ABS = 1.0
LOGPROB_MEAN_ABS = 0.15


@pytest.mark.slow
def test_merged_prompt_logprobs_match_hf(smollm2_path, smollm2_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylora_verl.core.adapter import load_adapter
    from tinylora_verl.verl.generation import VLLMBackend

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 bags with 4 apples each. How many apples?"}],
                                   tokenize=False, add_generation_prompt=True)
    text += "Each bag has 4 apples, so 3 bags have 3 * 4 = 12 apples.\n#### 12"
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def hf_logprobs(model):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32)
    hf_base = hf_logprobs(model)
    load_adapter(str(smollm2_adapter), model)
    hf_hooked = hf_logprobs(model)
    del model
    merged_dir = export(str(smollm2_path), str(smollm2_adapter), merged_out=str(tmp_path / "merged"),
                        progress=False).merged
    results = {}
    for name, kwargs in [("base", {"model_dir": str(smollm2_path)}), ("merged", {"model_dir": str(merged_dir)})]:
        backend = VLLMBackend(max_model_len=512, **kwargs)
        try:
            results[name] = torch.tensor(backend.prompt_logprobs(ids))
        finally:
            backend.close()
    d_base = (results["base"] - hf_base).abs()
    d_merged = (results["merged"] - hf_hooked).abs()
    effect = (hf_hooked - hf_base).abs()
    print(f"{len(ids)} tokens; |vLLM base - HF base| max {d_base.max():.4f} mean {d_base.mean():.4f}; "
          f"|vLLM merged - HF hooked| max {d_merged.max():.4f} mean {d_merged.mean():.4f}; "
          f"adapter effect |HF hooked - HF base| max {effect.max():.4f} mean {effect.mean():.4f}")
    assert d_merged.max() < LOGPROB_MAX_ABS and d_merged.mean() < LOGPROB_MEAN_ABS
    assert effect.mean() > 5 * d_merged.mean()  # the engine serves the adapted model, not the base


def test_lora_engine_start_failure_is_explained(monkeypatch, tmp_path):
    vllm = pytest.importorskip("vllm")
    from tinylora_verl.verl.generation import VLLMBackend

    def no_lora(**kwargs):
        raise NotImplementedError(f"LoRA is not supported on this platform (max_lora_rank={kwargs['max_lora_rank']})")

    monkeypatch.setattr(vllm, "LLM", no_lora)
    with pytest.raises(RuntimeError, match=r"this vLLM build could not start with LoRA support \(enable_lora=True, "
                                           r"max_lora_rank=8\): NotImplementedError: .*; use --mode merged"):
        VLLMBackend(str(tmp_path), lora_dir=str(tmp_path), lora_rank=2)


def test_plot_panels_select_verl_metric_names():
    """Keys as verl's file logger writes them: actor metrics carry an "actor/" prefix."""
    from tinylora_verl.apps.plots import PANELS, _keys_for

    keys = ["actor/tinylora/v_0", "actor/tinylora/v_10", "actor/tinylora/v_2", "actor/tinylora/v_norm",
            "actor/tinylora/sync_bytes", "critic/score/mean", "rollout_corr/kl", "actor/grad_norm"]
    panels = {title: _keys_for(patterns, keys) for title, patterns in PANELS}
    assert panels["v"][:3] == ["actor/tinylora/v_0", "actor/tinylora/v_2", "actor/tinylora/v_10"]
    assert "actor/tinylora/v_norm" in panels["v"] and "actor/tinylora/sync_bytes" not in panels["v"]
    assert panels["reward"] == ["critic/score/mean"] and panels["rollout vs trainer mismatch"] == ["rollout_corr/kl"]
