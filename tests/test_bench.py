"""Smoke tests of bench/: every benchmark on tiny seeded inputs; report structure only, no wall-clock assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import decode, e2e, fidelity, injection, overhead, overhead_ab, profiling, run
from bench.common import Section, bootstrap_ci, git_commit, interleaved_times, paired_ratios
from bench.autograd_hook import install
from tinylora_verl.core.config import DEFAULT_TARGET_MODULES
from tests.conftest import tiny_causal_lm
from tinylora_verl import TinyLoRAConfig, inject_tinylora

BUDGET = 7  # the tiny 2-layer model has 14 target modules: u = 1, 2 modules per group


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs gain nothing from threads, and on a busy machine OpenMP barriers make them crawl."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def factory(dtype):
    return tiny_causal_lm("qwen2", dtype=dtype)


def check_section(sec: Section, key: str):
    assert sec.key == key
    assert sec.rows and all(len(r) == len(sec.columns) for r in sec.rows)
    md = sec.markdown()
    header = "| " + " | ".join(c.replace("|", "\\|") for c in sec.columns) + " |"
    assert md.startswith(f"## {sec.title}") and header in md
    assert all(line.count("|") - line.count("\\|") == len(sec.columns) + 1 for line in md.splitlines()
               if line.startswith("| "))  # no stray pipe splits a cell
    json.dumps(sec.summary, default=str)


def test_interleaved_times_and_paired_ratios():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert len(calls) == 8 and calls[2:4] == ["b", "a"]  # the order rotates every round
    assert all(len(v) == 3 for v in times.values())
    assert paired_ratios(times, "a")["a"] == (1.0, 1.0, 1.0)


def test_interleaved_times_runs_adjacent_pairs_side_by_side_alternating():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "b off", "c", "c off")}
    times = interleaved_times(fns, repeats=4, warmup=0, adjacent={"b": "b off", "c": "c off"})
    rounds = [calls[i:i + 5] for i in range(0, 20, 5)]
    assert [r[0] for r in rounds] == ["a", "b off", "c", "a"]  # the units (a, b+off, c+off) rotate
    for i, rnd in enumerate(rounds):
        for k in ("b", "c"):
            at = rnd.index(k)
            assert rnd[at + 1 if i % 2 == 0 else at - 1] == k + " off"  # beside it: after in even rounds, else before
    assert all(len(v) == 4 for v in times.values())


@pytest.mark.parametrize("adjacent, message", [
    ({"a": "z"}, r"adjacent: 'a' -> 'z' must pair two different timed names"),
    ({"a": "a"}, r"'a' -> 'a' must pair two different"),
    ({"a": "b", "b": "c"}, r"'a' -> 'b' must pair .* each in one pair only"),
])
def test_interleaved_times_rejects_bad_pairs(adjacent, message):
    with pytest.raises(ValueError, match=message):
        interleaved_times({k: (lambda: None) for k in "abc"}, repeats=1, warmup=0, adjacent=adjacent)


def test_bootstrap_ci_of_the_median():
    xs = [1.0 + 0.01 * ((7 * i) % 11) for i in range(21)]  # 1.00 .. 1.10, median 1.05
    lo, hi = bootstrap_ci(xs, seed=3)
    assert min(xs) <= lo <= 1.05 <= hi <= max(xs) and hi - lo < 0.1
    assert bootstrap_ci(xs, seed=3) == (lo, hi)  # seeded: a report's interval is reproducible
    wide, narrow = bootstrap_ci(xs, level=0.99), bootstrap_ci(xs, level=0.5)
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"xs": []}, "bootstrap_ci: no samples"),
    ({"xs": [1.0], "level": 1.0}, r"level must be in \(0, 1\), got 1.0"),
    ({"xs": [1.0], "draws": 0}, "draws must be >= 1, got 0"),
])
def test_bootstrap_ci_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


def test_git_commit_names_the_checkout_and_its_changes(tmp_path):
    import subprocess

    assert git_commit(str(tmp_path)) == "unknown"  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("a")
    subprocess.run(git + ["add", "f.txt"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(str(tmp_path)) == f"{head} + uncommitted changes"


def test_overhead_structure():
    sec = overhead.run(factory, dtypes=(torch.float32, torch.bfloat16), batches=(1,), seq_len=8, repeats=1,
                       warmup=0, budget=BUDGET, full_ft=True, before=True, progress=None)
    check_section(sec, "overhead")
    names = {overhead.BASE, overhead.CONTROL, overhead.OURS, overhead.PEFT_TINY, overhead.PEFT_LORA, overhead.FULL_FT,
             overhead.AUTOGRAD, overhead.HOOK, overhead.NO_KERNEL, overhead.PER_MODULE}
    assert len(sec.rows) == 2 * len(names) + 1  # hook_dtype=activation applies to bf16 only
    assert {r[2] for r in sec.rows} == names | {overhead.OURS_ACT}
    bf16 = [c for c in sec.summary["cases"] if c["dtype"] == "bfloat16"][0]
    assert isinstance(bf16["ours_activation_meets_goal"], bool)
    for case in sec.summary["cases"]:
        assert case["trainable"][overhead.OURS] == case["trainable"][overhead.PEFT_TINY] == BUDGET
        assert case["trainable"][overhead.BASE] == 1
        assert case["ratio"][overhead.BASE] == 1.0 and case["paired_ratio"][overhead.BASE] == 1.0
        assert case["min_ratio"][overhead.BASE] == 1.0 and case["trainable"][overhead.CONTROL] == 1
        assert case["control"]["paired_ratio"] == case["paired_ratio"][overhead.CONTROL] > 0
        # every adapter is also timed on its own weights with the adapter off; the base copies have no switch
        switched = {overhead.OURS, overhead.AUTOGRAD, overhead.HOOK, overhead.NO_KERNEL, overhead.PER_MODULE,
                    overhead.PEFT_TINY, overhead.PEFT_LORA}
        assert switched <= set(case["self_ratio"]) <= switched | {overhead.OURS_ACT}
        assert all(r > 0 for r in case["self_ratio"].values()) and set(case["off_vs_base"]) == set(case["self_ratio"])
        assert set(case["self_ratio_ci"]) == set(case["self_ratio"])
        assert all(lo <= case["self_ratio"][k] <= hi for k, (lo, hi) in case["self_ratio_ci"].items())
        assert case["ours_meets_goal_ci"] == (case["self_ratio_ci"][overhead.OURS][1] <= sec.summary["goal"])
        assert isinstance(case["ours_meets_goal_across_copies"], bool)
        assert case["saved_bytes"][overhead.BASE] > 0
        assert isinstance(case["ours_meets_goal"], bool) and isinstance(case["ours_below_peft_tinylora"], bool)


def test_abba_pairs_alternate_and_average_each_side():
    calls = []

    def timed(name):
        def f():
            calls.append(name)
        return f

    got = overhead_ab.abba_pairs(timed("on"), timed("off"), pairs=3, warmup=1, after=lambda: calls.append("|"))
    seq = [c for c in calls if c != "|"]
    assert seq[:2] == ["on", "off"]  # warmup
    assert seq[2:] == ["on", "off", "off", "on", "off", "on", "on", "off", "on", "off", "off", "on"]
    assert calls.count("|") == len(seq)  # after() follows every call, timed or not
    assert all(len(v) == 3 for v in got.values()) and all(t >= 0 for v in got.values() for t in v)


@pytest.mark.parametrize("pairs, warmup", [(0, 1), (2, -1)])
def test_abba_pairs_errors(pairs, warmup):
    with pytest.raises(ValueError, match=f"pairs must be >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}"):
        overhead_ab.abba_pairs(lambda: None, lambda: None, pairs=pairs, warmup=warmup)


def test_overhead_ab_structure():
    sec = overhead_ab.run(factory, dtypes=(torch.float32, torch.bfloat16), batches=(1, 2), seq_len=8, pairs=3,
                          warmup=0, budget=BUDGET, progress=None)
    check_section(sec, "overhead-ab")
    assert [(c["dtype"], c["batch"]) for c in sec.summary["cases"]] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)]
    for c in sec.summary["cases"]:
        lo, hi = c["ci"]
        assert lo <= c["ratio"] <= hi and c["spread"][0] <= c["ratio"] <= c["spread"][1]
        assert c["meets_goal"] == (c["ratio"] <= sec.summary["goal"]) and c["meets_goal_ci"] == (hi <= 1.05)
        assert c["on_s"] > 0 and c["off_s"] > 0 and c["cpu_ratio"] > 0


def test_adapter_off_runs_the_base_on_the_same_weights():
    """The "vs own adapter off" baseline: with non-zero adapter weights, each switchable variant gives the base
    copy's logits inside its off() context and other logits outside it."""
    variants = overhead.build_variants(factory, torch.float32, BUDGET, before=True)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = variants[overhead.BASE].model(input_ids=ids).logits
        for name, v in variants.items():
            if v.off is None:
                continue
            for p in v.params[:-1]:  # the adapter's own; the last is the embeddings gate
                p.fill_(0.3)
            with v.off():
                torch.testing.assert_close(v.model(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5, msg=name)
            assert (v.model(input_ids=ids).logits - base).abs().max() > 1e-3, name


@pytest.mark.parametrize("dtype, hook_dtype", [(torch.float32, "float32"), (torch.bfloat16, "float32"),
                                               (torch.bfloat16, "activation")])
def test_autograd_hook_matches_package_hook(dtype, hook_dtype):
    """The package's hand-written backward (and shared x V) against the plain-autograd hook on a whole model."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for plain in (False, True):
        model = factory(dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(budget=BUDGET, hook_dtype=hook_dtype))
        fidelity.set_vectors(adapter, 0.3, "random-sign", seed=2)
        if plain:
            install(adapter)
        out = model(input_ids=ids).logits.float()
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([v.grad for v in adapter.vectors]))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=10 * tol, atol=tol)


def test_injection_structure():
    model = factory(torch.float32)
    from tinylora_verl import find_target_modules
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES

    mods = find_target_modules(model, DEFAULT_TARGET_MODULES)

    def real():
        return ((n, n.rsplit(".", 1)[-1], m.weight.detach()) for n, m in mods.items())

    shapes = {"q_proj": (520, 520), "down_proj": (520, 600)}  # > 32: the block Lanczos path
    sec = injection.run(real_modules=real, real_label="tiny", synth_shapes=shapes, synth_layers=(0,),
                        synth_total_layers=3, synth_label="synthetic", inject=lambda: 0.5, progress=None)
    check_section(sec, "injection")
    assert {r[0] for r in sec.rows} == {"tiny", "synthetic"}
    s = sec.summary["synthetic"]
    assert s["modules"] == 2 and s["scale"] == 3.0 and s["max_rel"] < 1e-3
    assert s["top_gemm_s"] > 0 and s["kernel_gain"] == pytest.approx(s["top_gemm_s"] / s["top_s"])
    assert sec.summary["tiny"]["modules"] == 14 and sec.summary["inject_tinylora_s"] == 0.5
    # The synthetic (Qwen-shaped) source also times the SVDs on one thread, as verl's actors ran them before.
    assert s["top_1thread_s"] > 0 and s["thread_gain"] == pytest.approx(s["top_1thread_s"] / s["top_s"])
    assert "top_1thread_s" not in sec.summary["tiny"]
    assert s["fingerprint_s"] > 0 and 0 < s["fingerprint_share"] < 1


def test_synthetic_weight_spectrum_is_seeded_and_decaying():
    a = injection.synthetic_weight((300, 200), seed=5, k=64)
    assert torch.equal(a, injection.synthetic_weight((300, 200), seed=5, k=64))
    s = torch.linalg.svdvals(a)
    assert s[0] / s[1] > 1.3 and s[2] > s[10] > s[63] > s[100]


def test_fidelity_structure():
    sec = fidelity.run(factory(torch.float32), budget=BUDGET, values=(1e-3, 1e-1), label="tiny", progress=None)
    check_section(sec, "fidelity")
    assert len(sec.rows) == 2 * 2 * 3
    fp32 = [c for c in sec.summary["cases"] if c["dtype"] == "float32"]
    assert all(abs(c["fidelity"] - 1) < 1e-3 for c in fp32)


def test_logprob_mismatch_of_merged_and_lora_delivery():
    """On bf16-exact base weights: fp32 delivery is exact either way; in bf16 the merge rounds W + ΔW against W,
    while the LoRA only rounds the small factors, so its log-probs stay far closer to the exact adapter's."""
    def bf16_exact():
        return factory(torch.bfloat16).float()

    sec = fidelity.run(bf16_exact(), budget=BUDGET, values=(1e-3, 3e-2), patterns=("random-sign",), label="tiny",
                       logprob_models=(bf16_exact(), bf16_exact()), progress=None)
    check_section(sec, "fidelity")
    cases = {(c["value"], c["dtype"]): c for c in sec.summary["cases"]}
    for value in (1e-3, 3e-2):
        assert cases[(value, "float32")]["logp_merged"] < 1e-5 and cases[(value, "float32")]["logp_lora"] < 1e-5
        bf16 = cases[(value, "bfloat16")]
        assert bf16["logp_merged"] > 10 * bf16["logp_lora"], bf16


def test_profile_structure():
    sec = profiling.run(factory, dtype=torch.float32, batch=1, seq_len=8, budget=BUDGET, rounds=1, top=5,
                        progress=None)
    check_section(sec, "profile")
    calls = sec.summary["op_calls"]
    assert calls[overhead.OURS] > calls[overhead.BASE] and sec.summary["n_modules"] == 14


def write_metrics(path, scale=1.0):
    # verl's names: worker metrics carry the role prefix (actor/tinylora/...).
    lines = [{"step": s, "data": {"actor/tinylora/sync_bytes": 2.6e8 * scale, "actor/tinylora/sync_seconds": 0.5 + s,
                                  "timing_s/step": (10.0 + s) * scale, "actor/loss": 1.0,
                                  "training/rollout_probs_diff_mean": 0.01 * scale}} for s in range(1, 5)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")


def test_e2e_summary(tmp_path):
    p = tmp_path / "metrics.jsonl"
    write_metrics(p)
    sec = e2e.run(p, floor_bytes=26, skip_first=1, progress=None)
    check_section(sec, "e2e")
    assert {r[0] for r in sec.rows} == {"tinylora/sync_bytes", "tinylora/sync_seconds", "timing_s/step"}
    assert sec.summary["metrics"]["timing_s/step"]["n"] == 3
    assert sec.summary["sync_bytes_over_floor"] == pytest.approx(1e7)
    assert any("malformed" in n for n in sec.notes)


def test_e2e_compare_side_by_side(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_metrics(a)
    write_metrics(b, scale=0.5)
    sec = e2e.compare({"merged": a, "lora": b}, progress=None)
    check_section(sec, "e2e-compare")
    rows = {r[0]: r for r in sec.rows}
    assert rows["timing_s/step"][1:] == [13.0, 6.5, "0.5"]
    assert rows["training/rollout_probs_diff_mean"][3] == "0.5" and "tinylora/sync_bytes" in rows
    assert sec.columns == ["metric", "merged (median)", "lora (median)", "lora / merged"]
    assert f"merged = `{tmp_path.name}/a.jsonl`" in sec.notes[0]  # runs' files all named metrics.jsonl differ by dir
    with pytest.raises(SystemExit, match=r"--e2e-compare 'x' must be LABEL=PATH"):
        run.main(["--only", "e2e", "--e2e-compare", "x", "--out", str(tmp_path / "r.md")])


def test_main_writes_report(tmp_path):
    p, out, js = tmp_path / "metrics.jsonl", tmp_path / "report.md", tmp_path / "s.json"
    write_metrics(p)
    assert run.main(["--only", "e2e", "--e2e-metrics", str(p), "--out", str(out), "--json", str(js),
                     "--allocator", "default"]) == 0
    text = out.read_text()
    for part in ("# tinylora_verl benchmarks", "## Machine", "| commit |",
                 "torch threads", "python -m bench.run --only e2e",
                 "## End-to-end metrics", "## Headline", "| allocator | default (glibc's own tuning) |"):
        assert part in text
    assert "e2e" in json.loads(js.read_text())


ALLOC_PROBE = """
import sys, torch
from bench.common import steady_allocator
if sys.argv[1] == "steady":
    print(steady_allocator())
a = torch.empty(2**22)  # 16 MiB
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
print(any(int(lo, 16) <= a.data_ptr() < int(hi, 16) for lo, hi in heap))
"""


@pytest.mark.parametrize("mode, from_heap", [("steady", "True"), ("default", "False")])
def test_steady_allocator_fixes_the_mmap_threshold(mode, from_heap):
    """In a child process (the setting lasts for the process): glibc maps a fresh 16 MiB tensor with mmap (fresh
    pages on every allocation) unless steady_allocator raised the threshold, which puts it on the heap."""
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.split("\n")
    if mode == "steady":
        assert out.pop(0).startswith("glibc, fixed: mmap threshold 32 MiB")
    assert out[0] == from_heap


def write_clean(path):
    write_metrics(path)
    path.write_text(path.read_text().replace("not json\n", ""))


class FakeRun:
    def __init__(self, returncode):
        self.returncode = returncode

    def log_text(self):
        return "line 1\nTraceback: boom"


def test_lora_sync_bytes_are_peft_loras_on_the_wire(tmp_path):
    """The verl LoRA baseline's per-step sync, from shapes: peft's own rank-8 adapter, in bf16."""
    from peft import LoraConfig, get_peft_model

    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=list(DEFAULT_TARGET_MODULES)))
    wire = sum(p.numel() * 2 for n, p in peft_model.named_parameters() if "lora_" in n)
    assert e2e.lora_sync_bytes(tmp_path / "tiny", 8) == wire > 0


def test_e2e_compare_adds_computed_values(tmp_path):
    write_clean(tmp_path / "a.jsonl")
    sec = e2e.compare({"merged": tmp_path / "a.jsonl", "verl LoRA r=8": tmp_path / "a.jsonl"}, progress=None,
                      computed={"verl LoRA r=8": {"perf/peak_rss_gb": 7.5}})
    assert sec.summary["medians"]["verl LoRA r=8"]["perf/peak_rss_gb"] == 7.5
    assert any("computed from the adapter's shapes" in n for n in sec.notes)


def test_e2e_run_recipes_runs_missing_and_reuses_complete(tmp_path, monkeypatch):
    import tinylora_verl.apps.demo as demo

    calls = []

    def fake(run_dir, steps, recipe, overrides, timeout, echo):
        calls.append((recipe, steps, tuple(overrides)))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_clean(run_dir / "metrics.jsonl")
        return FakeRun(0)

    monkeypatch.setattr(demo, "run_cpu_recipe", fake)
    (tmp_path / "tinylora_gsm8k_cpu").mkdir()
    write_clean(tmp_path / "tinylora_gsm8k_cpu" / "metrics.jsonl")  # 4 complete steps: reused
    paths = e2e.run_recipes(tmp_path, steps=3, progress=None)
    assert list(paths) == [label for label, _ in e2e.RECIPES]
    assert [c[0] for c in calls] == ["tinylora_gsm8k_cpu_lora", "tinylora_gsm8k_cpu_native",
                                     "tinylora_gsm8k_cpu_verl_lora"]
    assert all(c[1] == 3 and "data.seed=0" in c[2] for c in calls)
    assert all(p.is_file() for p in paths.values())

    monkeypatch.setattr(demo, "run_cpu_recipe", lambda *a, **k: FakeRun(1))
    with pytest.raises(RuntimeError, match=r"\+recipe=tinylora_gsm8k_cpu failed \(exit 1\)[^$]*boom"):
        e2e.run_recipes(tmp_path / "fresh", steps=2, progress=None)


def test_e2e_steps_must_leave_a_step_after_warmup(tmp_path):
    with pytest.raises(SystemExit, match=r"--e2e-steps must be >= 2 .*got 1"):
        run.main(["--only", "e2e", "--e2e-run", str(tmp_path), "--e2e-steps", "1", "--out", str(tmp_path / "r.md")])


def test_main_runs_the_verl_recipes_before_loading_any_model(tmp_path, monkeypatch):
    """The recipes' workers need the memory the in-process sections' models would keep (the steady allocator does
    not give it back): with --e2e-run they run first, and their comparison still comes last in the report."""
    calls = []

    def fake_recipes(out_dir, steps):
        calls.append("recipes")
        write_clean(tmp_path / "m.jsonl")
        return {"merged": tmp_path / "m.jsonl"}

    def fake_factory():
        calls.append("model")
        raise RuntimeError("stop after the order is known")

    monkeypatch.setattr(e2e, "run_recipes", fake_recipes)
    monkeypatch.setattr(run, "smollm2_factory", fake_factory)
    with pytest.raises(RuntimeError, match="stop after the order is known"):
        run.main(["--only", "fidelity", "--e2e-run", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md"),
                  "--allocator", "default"])
    assert calls == ["recipes", "model"]


def _decode_result(mode, tps):
    return {"mode": mode, "tokens": 64, "round_s": [64 / tps] * 3, "startup_s": 1.0, "tokens_per_s": tps}


def test_decode_section_ratios_to_merged_and_goal():
    results = {m: _decode_result(m, tps) for m, tps in (("merged", 100.0), ("native", 96.0), ("lora", 50.0))}
    sec = decode.section(results, {"budget": 13, "scale": 0.1}, prompts=2, samples=2, max_tokens=16, seconds=1.0)
    check_section(sec, "decode")
    torch.testing.assert_close(sec.summary["ratios"], {"merged": 1.0, "native": 0.96, "lora": 0.5})
    assert sec.summary["native_meets_goal"] is True
    results["native"] = _decode_result("native", 90.0)
    sec = decode.section(results, {"budget": 13, "scale": 0.1}, prompts=2, samples=2, max_tokens=16, seconds=1.0)
    assert sec.summary["native_meets_goal"] is False and any("MISSED" in n for n in sec.notes)
    assert any("generation at a fixed token count" in h and "MISSED" in h for h in run.headline({"decode": sec}))


@pytest.mark.parametrize("kwargs, message", [
    ({"modes": ("native", "lora")}, r"merged \(the reference\) must be among them"),
    ({"modes": ("merged", "fused")}, r"\['merged', 'fused'\]: each must be one of"),
    ({"rounds": 0}, r"rounds=0, .* must all be >= 1"),
    ({"passes": 0}, r"passes=0, .* must all be >= 1"),
])
def test_decode_run_rejects_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        decode.run(str(tmp_path), tmp_path / "work", **kwargs)


def test_decode_processes_run_in_mirrored_passes_and_pool_their_rounds():
    assert decode.process_order(("merged", "native", "lora"), 3) == [
        "merged", "native", "lora", "lora", "native", "merged", "merged", "native", "lora"]
    pooled = decode.pool([dict(_decode_result("native", 64.0), round_s=[1.0, 3.0]),
                          dict(_decode_result("native", 64.0), round_s=[2.0], startup_s=3.0)])
    assert pooled["round_s"] == [1.0, 3.0, 2.0] and pooled["processes"] == 2
    assert pooled["tokens_per_s"] == 64 / 2.0 and pooled["startup_s"] == 2.0


def test_decode_prepare_writes_each_modes_form(tmp_path):
    """What the three workers serve comes from one adapter: its merged and LoRA exports and the native stream."""
    from tinylora_verl.core import native
    from tinylora_verl.core.adapter_io import read_adapter

    model_dir = tmp_path / "model"
    factory(torch.float32).save_pretrained(model_dir)
    meta = decode.prepare(str(model_dir), tmp_path / "work", budget=BUDGET, scale=0.1)
    v, _ = read_adapter(str(tmp_path / "work" / "adapter.safetensors"))
    torch.testing.assert_close(v.abs(), torch.full_like(v, 0.1))
    assert meta["v"] == v.flatten().tolist()
    payload = torch.load(tmp_path / "work" / "native.pt", weights_only=False)
    assert [n for n, _ in payload["step"]] == [native.V_NAME, native.CHECK_NAME]
    assert payload["checksum"] == native.v_checksum(v.float()) == int(payload["step"][1][1])
    assert {native.parse_factor_name(n)[0] for n, _ in payload["install"]} and payload["rank"] == 2
    assert list((tmp_path / "work" / "merged").glob("*.safetensors"))
    assert (tmp_path / "work" / "lora" / "adapter_config.json").is_file()
