"""Generation throughput of the three sync modes at a fixed token count: merged vs native vs lora in vLLM CPU.

The end-to-end runs time generation too, but each mode samples different responses there (lengths differ by tens
of percent), so their ratio mixes the forward's cost with what was sampled. Here every mode generates exactly the
same number of tokens (``ignore_eos``, fixed ``max_tokens``) for the same prompts, in the CPU rollout's settings
(float32, eager, one engine per process), with the same trained adapter (v = ``scale`` · a seeded random sign):

* ``merged``: a folder holding ``bf16(W + ΔW)`` (the recipe's ``sync_dtype``), served like a plain model;
* ``native``: the base plus the plugin (``additional_config.tinylora_native``), the install and then v through
  ``model.load_weights``, the route verl's GPU receiver takes; the worker checks that the server holds v's checksum;
* ``lora``: the exact rank-r LoRA through vLLM's LoRA support (what ``sync_mode: lora`` serves).

Each mode runs in its own process (``python -m bench.decode MODE WORK OUT``): vLLM keeps global state, and a fresh
process per mode gives each the same allocator history. Within it, one untimed round and ``rounds`` timed ones.
Rounds of one process vary by several percent on a shared 2-core machine, so the processes run in mirrored passes
(merged, native, lora, then lora, native, merged, ...: a linear drift of the machine cancels out) and a mode's
throughput is its generated tokens over the median of all its timed rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import Section, log

MODES = ("merged", "native", "lora")
GOAL = 0.95  # native throughput / merged throughput (issue 27)


def prepare(model_dir: str, work: Path, budget: int = 13, scale: float = 0.1, seed: int = 0) -> dict:
    """Write what each mode serves into ``work``: the adapter, its merged and LoRA exports, the native payload."""
    import torch
    from transformers import AutoModelForCausalLM

    from tinylora_verl import TinyLoRAConfig, inject_tinylora
    from tinylora_verl.apps.export import export
    from tinylora_verl.core import native

    work.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=budget, seed=seed))
    direction = torch.randn(adapter.num_trainable, generator=torch.Generator().manual_seed(seed)).sign()
    with torch.no_grad():
        for p, d in zip(adapter.parameters(), direction.split(adapter.num_trainable // len(adapter.vectors))):
            p.copy_(scale * d.reshape(p.shape))
    adapter.save_adapter(str(work / "adapter.safetensors"))
    v = torch.stack([p.detach().float() for p in adapter.vectors])  # (groups, u)
    install = list(native.install_tensors((n, adapter.factors(n)[:4], adapter.group_of(n))
                                          for n in adapter.module_names))
    torch.save({"install": install, "step": native.step_tensors(v), "rank": adapter.config.r,
                "checksum": native.v_checksum(v)}, work / "native.pt")
    del model, adapter
    export(model_dir, str(work / "adapter.safetensors"), merged_out=str(work / "merged"),
           lora_out=str(work / "lora"), dtype="bfloat16", progress=False, overwrite=True)
    return {"scale": scale, "budget": budget, "seed": seed, "v": v.flatten().tolist()}


def process_order(modes: tuple[str, ...], passes: int) -> list[str]:
    """The processes to run, in mirrored passes: ``modes``, then ``modes`` reversed, and so on."""
    return [m for i in range(passes) for m in (modes if i % 2 == 0 else modes[::-1])]


def pool(runs: list[dict]) -> dict:
    """One mode's processes as one result: all timed rounds, the mean start-up, tokens over the median round."""
    rounds = [t for r in runs for t in r["round_s"]]
    return {"mode": runs[0]["mode"], "tokens": runs[0]["tokens"], "round_s": rounds, "processes": len(runs),
            "startup_s": statistics.mean(r["startup_s"] for r in runs),
            "tokens_per_s": runs[0]["tokens"] / statistics.median(rounds)}


def run(model_dir: str, work: str | os.PathLike, prompts: int = 8, samples: int = 4, max_tokens: int = 128,
        rounds: int = 3, passes: int = 2, scale: float = 0.1, modes: tuple[str, ...] = MODES,
        timeout: int = 1800) -> Section:
    """Prepare once, then time each mode in ``passes`` processes of its own; the summary holds the ratios to
    merged."""
    bad = [m for m in modes if m not in MODES]
    if bad or "merged" not in modes:
        raise ValueError(f"decode modes {list(modes)}: each must be one of {list(MODES)}, and merged (the reference) "
                         "must be among them")
    if min(rounds, passes, prompts, samples, max_tokens) < 1:
        raise ValueError(f"decode: rounds={rounds}, passes={passes}, prompts={prompts}, samples={samples}, "
                         f"max_tokens={max_tokens} must all be >= 1")
    t0 = time.perf_counter()
    work = Path(work)
    log(f"decode: preparing the adapter (|v| = {scale:g}) and its merged, LoRA and native forms in {work}")
    meta = prepare(model_dir, work, scale=scale)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    order = process_order(tuple(modes), passes)
    for i, mode in enumerate(order):
        out = work / f"{mode}.json"
        log(f"decode: process {i + 1}/{len(order)}, {mode}: {prompts} prompts x {samples} samples x {max_tokens} "
            f"tokens, {rounds} timed rounds")
        proc = subprocess.run([sys.executable, "-m", "bench.decode", mode, str(work), str(out), model_dir,
                               str(prompts), str(samples), str(max_tokens), str(rounds)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"decode worker {mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        runs[mode].append(json.loads(out.read_text()))
        log(f"decode: {mode}: {runs[mode][-1]['tokens_per_s']:.1f} tokens/s "
            f"(rounds {[round(t, 2) for t in runs[mode][-1]['round_s']]})")
    results = {m: pool(r) for m, r in runs.items()}
    return section(results, meta, prompts, samples, max_tokens, time.perf_counter() - t0)


def section(results: dict[str, dict], meta: dict, prompts: int, samples: int, max_tokens: int,
            seconds: float) -> Section:
    ref = results["merged"]["tokens_per_s"]
    rows, ratios = [], {}
    for mode, r in results.items():
        ratios[mode] = r["tokens_per_s"] / ref
        rows.append([mode, r["tokens"], r.get("processes", 1), len(r["round_s"]), statistics.median(r["round_s"]),
                     min(r["round_s"]), max(r["round_s"]), r["tokens_per_s"], ratios[mode], r["startup_s"]])
    native = ratios.get("native")
    notes = [f"{prompts} GSM8K prompts x {samples} samples x {max_tokens} tokens (ignore_eos), float32, eager, "
             f"one vLLM engine per process, processes in mirrored passes; adapter: {meta['budget']} scalars at "
             f"|v| = {meta['scale']:g} (seeded random signs)",
             "throughput = generated tokens a round / median of the mode's timed rounds; ratio = mode / merged"]
    if native is not None:
        notes.append(f"native / merged = {native:.3f} (goal ≥ {GOAL}: {'met' if native >= GOAL else 'MISSED'})")
    return Section("decode", "Generation throughput at a fixed token count (vLLM CPU)",
                   ["mode", "tokens a round", "processes", "timed rounds", "median round s", "min s", "max s",
                    "tokens/s", "× merged", "startup s"],
                   rows, notes, {"ratios": ratios, "goal": GOAL, "native_meets_goal": None if native is None
                                 else native >= GOAL, "results": results}, seconds)


def worker(mode: str, work: Path, out: Path, model_dir: str, prompts: int, samples: int, max_tokens: int,
           rounds: int) -> dict:
    """One mode's engine: start it, deliver the adapter, one untimed round, then ``rounds`` timed ones."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import SamplingParams

    from tinylora_verl.tasks.data import GSM8K_SLICE_DIR
    from tinylora_verl.tasks.problems import load_benchmark
    from tinylora_verl.verl.generation import VLLMBackend

    t0 = time.perf_counter()
    kwargs = dict(dtype="float32", max_model_len=1024, max_num_seqs=64, gpu_memory_utilization=0.3)
    if mode == "merged":
        backend = VLLMBackend(str(work / "merged"), **kwargs)
    elif mode == "lora":
        backend = VLLMBackend(model_dir, lora_dir=str(work / "lora"), **kwargs)
    elif mode == "native":
        payload = torch.load(work / "native.pt", weights_only=False)
        backend = VLLMBackend(model_dir, additional_config={"tinylora_native": {"rank": payload["rank"]}}, **kwargs)
        held = backend.llm.collective_rpc(_install, args=(payload["install"] + payload["step"],))[0]
        if held != payload["checksum"]:
            raise RuntimeError(f"native: the server holds checksum {held}, the adapter's is {payload['checksum']}")
    else:
        raise ValueError(f"decode worker: mode {mode!r} is not one of {list(MODES)}")
    startup = time.perf_counter() - t0
    ids = [backend.prompt_ids(p.messages)
           for p in load_benchmark("gsm8k", GSM8K_SLICE_DIR, "test", limit=prompts, prompt_style="oneshot")]
    sp = SamplingParams(n=samples, temperature=1.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    times, tokens = [], 0
    for i in range(rounds + 1):
        start = time.perf_counter()
        outs = backend.llm.generate([{"prompt_token_ids": x} for x in ids], sp, lora_request=backend.lora_request,
                                    use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        if tokens != prompts * samples * max_tokens:
            raise RuntimeError(f"{mode}: generated {tokens} tokens, expected {prompts * samples * max_tokens}")
        if i:  # the first round warms the allocator and the prefix cache
            times.append(elapsed)
    result = {"mode": mode, "tokens": tokens, "round_s": times, "startup_s": startup,
              "tokens_per_s": tokens / statistics.median(times)}
    out.write_text(json.dumps(result))
    return result


def _install(worker, tensors) -> int | None:
    """Runs inside vLLM's worker: the native stream through ``model.load_weights``; the checksum the model holds."""
    model = worker.model_runner.get_model()
    model.load_weights(iter(tensors))
    state = getattr(model, "_tinylora_native", None)
    return None if state is None else state.checksum


if __name__ == "__main__":
    mode_, work_, out_, model_, p_, s_, t_, r_ = sys.argv[1:9]
    worker(mode_, Path(work_), Path(out_), model_, int(p_), int(s_), int(t_), int(r_))
