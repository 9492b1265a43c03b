"""Subprocess helper: vLLM CPU prompt log-probs of fixed token ids under TinyLoRA syncs, native or merged.

    python native_probe.py MODEL_DIR PAYLOAD.pt OUT_JSON MODE EAGER

``PAYLOAD.pt`` holds ``ids`` and, per scale of |v|, the trainer's native step tensors (v + checksum) and its merged
stream. ``MODE=native`` starts vLLM with ``additional_config.tinylora_native`` (the plugin attaches its hooks at
load), installs the factors once through ``model.load_weights`` (the route verl's GPU receiver takes) and then
sends only each scale's v; ``MODE=merged`` reloads each scale's merged weights (the CPU receiver's call).
``EAGER=0`` lets vLLM compile the model (torch.compile with Inductor on CPU) before any sync.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def prompt_logprobs(llm, ids):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)
    lp = out[0].prompt_logprobs
    return [lp[i][ids[i]].logprob for i in range(1, len(ids))]


def load_through_model(worker, tensors):
    model = worker.model_runner.get_model()
    model.load_weights(iter(tensors))
    state = getattr(model, "_tinylora_native", None)
    return None if state is None else {"checksum": state.checksum, "syncs": state.syncs, "layers": len(state.layers)}


def main(model_dir, payload_path, out_json, mode, eager):
    import torch
    from vllm import LLM

    payload = torch.load(payload_path, weights_only=False)
    ids = payload["ids"]
    extra = {"additional_config": {"tinylora_native": {"rank": 2}}} if mode == "native" else {}
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=eager == "1", max_model_len=256, seed=0,
              distributed_executor_backend="uni", gpu_memory_utilization=0.3, **extra)
    result = {"base": prompt_logprobs(llm, ids), "scales": {}, "states": []}
    for i, (scale, entry) in enumerate(payload["scales"].items()):
        if mode == "native":
            tensors = (payload["install"] if i == 0 else []) + entry["native"]
            result["states"].append(llm.collective_rpc(load_through_model, args=(tensors,))[0])
        else:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": entry["merged"],
                                                         "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        result["scales"][scale] = prompt_logprobs(llm, ids)
    json.dump(result, open(out_json, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:6])
