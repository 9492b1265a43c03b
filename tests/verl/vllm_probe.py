"""Subprocess helper: vLLM CPU prompt log-probs of fixed token ids, before and after an in-place weight reload.

    python vllm_probe.py MODEL_DIR WEIGHTS.safetensors IDS_JSON OUT_JSON

The reload is vLLM's ``Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)``, the call the
CPU weight-sync receiver (tinylora_verl.verl.cpu.rollout) makes with the trainer's per-tensor stream.
Runs in its own process: vLLM initializes torch.distributed, which the test process already has.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def prompt_logprobs(llm, ids):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    lp = out[0].prompt_logprobs
    return [lp[i][ids[i]].logprob for i in range(1, len(ids))]


def main(model_dir, weights, ids_json, out_json):
    from safetensors.torch import load_file
    from vllm import LLM

    ids = json.loads(open(ids_json).read())
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0,
              distributed_executor_backend="uni", gpu_memory_utilization=0.3)
    base = prompt_logprobs(llm, ids)
    tensors = list(load_file(weights).items())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors, "is_checkpoint_format": True})
    llm.reset_prefix_cache()
    synced = prompt_logprobs(llm, ids)
    json.dump({"base": base, "synced": synced}, open(out_json, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
