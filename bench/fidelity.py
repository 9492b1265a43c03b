"""Merge fidelity: how much of ΔW survives ``cast(W + ΔW)`` in bf16, fp16 and fp32, as a function of |v|.

For each value ``a`` of |v| and each pattern (every vᵢ = +a, or vᵢ = ±a with seeded random signs), the adapter's
vectors are set and :meth:`TinyLoRAAdapter.merge_fidelity` is called per dtype:
``fidelity = ‖cast(W+ΔW) − cast(W)‖ / ‖ΔW‖`` over all merged weights, ``rel_error = ‖delivered − ΔW‖ / ‖ΔW‖``
per module (mean and max reported). ``‖ΔW‖/‖W‖`` (over all targets) puts the size of the update in context:
bf16 has 8 significant bits, so updates far below 2⁻⁹ ≈ 2e-3 of a weight mostly round away.

With ``logprob_models`` (two float32 copies of the same model), the log-prob mismatch that results is measured too:
next-token log-probs of the exact adapter (hooked, float32 compute) against those of the merged weights
``cast(W + ΔW)`` and of the LoRA a ``sync_mode: lora`` rollout holds (``W + cast(B) cast(A)``), both computed in
float32, so the difference is the delivery's alone, with no kernel or activation-precision noise in it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .common import Section, log

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALUES = (1e-4, 1e-3, 1e-2, 1e-1)


def set_vectors(adapter, value: float, pattern: str, seed: int = 0) -> None:
    """Set every vᵢ to ``value`` (``pattern='equal'``) or to ``±value`` with seeded signs (``'random-sign'``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.vectors:
            if pattern == "equal":
                p.fill_(value)
            elif pattern == "random-sign":
                signs = torch.randint(0, 2, p.shape, generator=gen).to(torch.float32) * 2 - 1
                p.copy_((signs * value).to(p.dtype))
            else:
                raise ValueError(f"pattern should be 'equal' or 'random-sign', got {pattern!r}")


def _next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()  # (batch, seq - 1, vocab)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (batch, seq - 1)


class LogprobProbe:
    """Exact (hooked) vs delivered (merged or LoRA) next-token log-probs on a float32 copy of the model."""

    def __init__(self, model: nn.Module, plain: nn.Module, budget: int, seq_len: int = 256, seed: int = 0):
        from tinylora_verl import TinyLoRAConfig, inject_tinylora

        self.model, self.plain = model, plain
        self.adapter = inject_tinylora(model, TinyLoRAConfig(budget=budget))
        self.base = {k: t.detach().clone() for k, t in plain.state_dict().items()}
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen)  # (1, seq)

    @torch.no_grad()
    def mismatch(self, value: float, pattern: str, seed: int, dtype: torch.dtype) -> tuple[float, float]:
        """Mean |Δ log p| of merged and of LoRA delivery in ``dtype``, against the exact adapter."""
        set_vectors(self.adapter, value, pattern, seed)
        exact = _next_token_logprobs(self.model, self.ids)
        merged = {n: t.to(torch.float32) for n, t in self.adapter.merged_named_tensors(dtype=dtype)}
        self.plain.load_state_dict(merged)
        d_merged = (_next_token_logprobs(self.plain, self.ids) - exact).abs().mean().item()
        # The factors exactly as sync_mode=lora streams them (peft names, cast to dtype).
        factors = dict(self.adapter.lora_named_tensors(dtype))
        lora = dict(self.base)
        for name in self.adapter.module_names:
            A = factors[f"base_model.model.{name}.lora_A.weight"].float()  # (r, in)
            B = factors[f"base_model.model.{name}.lora_B.weight"].float()  # (out, r)
            lora[f"{name}.weight"] = self.base[f"{name}.weight"] + B @ A
        self.plain.load_state_dict(lora)
        d_lora = (_next_token_logprobs(self.plain, self.ids) - exact).abs().mean().item()
        return d_merged, d_lora


def run(model: nn.Module, budget: int = 13, values: Sequence[float] = VALUES,
        patterns: Sequence[str] = ("equal", "random-sign"), dtypes: Sequence[torch.dtype] = DTYPES,
        label: str = "SmolLM2-135M", seed: int = 0, logprob_models: Optional[tuple[nn.Module, nn.Module]] = None,
        progress: Optional[Callable[[str], None]] = log) -> Section:
    """Inject TinyLoRA(budget) into ``model`` (its real weights) and tabulate merge fidelity per dtype and |v|;
    ``logprob_models`` = two float32 copies of it (one hooked, one plain) adds the log-prob mismatch."""
    from tinylora_verl import TinyLoRAConfig, inject_tinylora

    start = time.perf_counter()
    progress = progress or (lambda s: None)
    progress(f"fidelity: injecting TinyLoRA(budget={budget}) into {label}")
    adapter = inject_tinylora(model, TinyLoRAConfig(budget=budget))
    probe = LogprobProbe(*logprob_models, budget=budget, seed=seed) if logprob_models else None
    w_sq = sum(m.weight.detach().float().square().sum().item() for _, m in adapter.named_adapted_modules())
    rows, cases = [], []
    try:
        for pattern in patterns:
            for value in values:
                set_vectors(adapter, value, pattern, seed)
                for dtype in dtypes:
                    overall, per = adapter.merge_fidelity(dtype)
                    rel = [m.rel_error for m in per]
                    d_sq = sum(m.delta_norm**2 for m in per)
                    dname = str(dtype).replace("torch.", "")
                    case = {"pattern": pattern, "value": value, "dtype": dname, "fidelity": overall,
                            "mean_rel_error": sum(rel) / len(rel), "max_rel_error": max(rel),
                            "delta_over_w": (d_sq / w_sq) ** 0.5}
                    row = [pattern, value, dname, case["delta_over_w"], overall, case["mean_rel_error"],
                           case["max_rel_error"]]
                    if probe is not None:
                        case["logp_merged"], case["logp_lora"] = probe.mismatch(value, pattern, seed, dtype)
                        row += [case["logp_merged"], case["logp_lora"]]
                    cases.append(case)
                    rows.append(row)
                    progress(f"fidelity: {pattern} |v|={value:g} {dname}: fidelity {overall:.4f} "
                             f"mean rel_error {case['mean_rel_error']:.3e}"
                             + (f", |Δlog p| merged {case['logp_merged']:.2e} lora {case['logp_lora']:.2e}"
                                if probe is not None else ""))
    finally:
        adapter.remove()
    notes = [
        f"{label}, every target linear (TinyLoRA budget {budget}: {adapter.num_trainable} scalars, "
        f"{len(adapter.module_names)} modules); base weights as stored in the checkpoint.",
        "fidelity = ‖cast(W+ΔW) − cast(W)‖/‖ΔW‖ over all modules (1 = delivered in full; in bf16 a small ΔW "
        "rounds away or is amplified to the nearest representable step, so fidelity can also exceed 1); "
        "rel_error = ‖delivered − ΔW‖/‖ΔW‖ per module.",
        "with u = 1 (budget < number of modules) a sign flip of vᵢ only flips its group's ΔW, so 'equal' and "
        "'random-sign' agree up to round-off; they differ when u > 1.",
        "W + ΔW is formed in float32 from the pristine weights and cast once: what "
        "`merged_named_tensors(dtype=...)` sends to the rollout engine.",
    ]
    if probe is not None:
        notes.append("|Δlog p| = mean absolute difference of next-token log-probs (one seeded random sequence of "
                     f"{probe.ids.shape[1]} tokens) between the exact adapter and what a rollout holding the "
                     "weights in that dtype serves: merged = `cast(W+ΔW)`, lora = `W + cast(B) cast(A)` (the "
                     "base is sent once and, for SmolLM2, is bf16-exact); all computed in float32.")
    cols = ["v pattern", "|v|", "merge dtype", "‖ΔW‖/‖W‖", "fidelity", "mean rel_error", "max rel_error"]
    if probe is not None:
        cols += ["|Δlog p| merged", "|Δlog p| lora"]
    return Section("fidelity", "Merge fidelity by dtype and |v|", cols, rows, notes, {"cases": cases},
                   time.perf_counter() - start)
