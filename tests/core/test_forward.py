"""How adapted modules run inside a model: fused forwards, hooks for other linears, shared projections, caches."""

import copy

import pytest
import torch
from torch import nn

from tests.conftest import assert_rounded_once_to_bf16, tiny_causal_lm
from bench.variants import reroute
from tinylora_verl import TinyLoRAConfig, inject_tinylora
from tinylora_verl.core.forward import runs_plain_linear_forward

CONFIG = dict(tie_size=3, u=2, init="normal", init_std=0.3)


def run(model, dtype=None, seed=1):
    """Logits, v-gradients and the input embeddings' gradient of one forward+backward."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    if dtype is None:
        logits = model(inputs_embeds=emb).logits
    else:
        with torch.autocast("cpu", dtype=dtype):
            logits = model(inputs_embeds=emb).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), emb.grad


# (case, model dtype, autocast dtype, hook_dtype, rtol): in bf16 the two paths round the input gradient at
# different points (the hook adds autograd's separate bf16 term), so they agree to bf16 precision over the layers.
PATHS = [("fp32", torch.float32, None, "float32", 1e-5), ("bf16", torch.bfloat16, None, "float32", 3e-2),
         ("bf16-activation", torch.bfloat16, None, "activation", 5e-2),
         ("fp32-autocast", torch.float32, torch.bfloat16, "float32", 3e-2)]


@pytest.mark.parametrize("case, dtype, autocast, hook_dtype, rtol", PATHS, ids=[p[0] for p in PATHS])
def test_fused_shared_and_hook_paths_agree(case, dtype, autocast, hook_dtype, rtol):
    """Fused with q/k/v and gate/up one node per group (the default), a node per module with shared projections,
    with one projection per module, and hooks on every module: same logits, v-gradients and input gradients."""
    results = []
    for kwargs in ({}, {"group_nodes": False}, {"share_inputs": False}, {"fused": False}):
        model = tiny_causal_lm("llama").to(dtype)
        adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG, hook_dtype=hook_dtype))
        if kwargs:
            reroute(adapter, **kwargs)
        modes = {adapter.forward_mode(n) for n in adapter.module_names}
        assert modes == {"hook" if kwargs.get("fused") is False else "fused"}
        logits, x_grad = run(model, autocast)
        assert adapter.forwards.shared_inputs == {} and adapter.forwards.group_nodes.outputs == {}
        assert adapter.forwards.group_nodes.ungrouped == set()
        results.append((logits, x_grad, [p.grad.clone() for p in adapter.parameters()]))
    (l0, x0, g0) = results[0]
    for logits, x_grad, grads in results[1:]:
        torch.testing.assert_close(logits, l0, rtol=rtol, atol=1e-5)
        torch.testing.assert_close(x_grad.float(), x0.float(), rtol=rtol, atol=rtol * x0.float().abs().max().item())
        for a, b in zip(grads, g0):  # a component near 0 is judged against its vector's scale
            torch.testing.assert_close(a, b, rtol=rtol, atol=max(1e-6, rtol * b.abs().max().item()))


class ScaledLinear(nn.Linear):
    """A linear with its own forward: the fused op must not replace it."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_linears_with_their_own_forward_get_the_hook():
    model = tiny_causal_lm("llama")
    attn = model.model.layers[0].self_attn
    old = attn.o_proj
    attn.o_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    attn.o_proj.load_state_dict(old.state_dict())
    wrapped = model.model.layers[1].mlp.down_proj
    plain_forward = wrapped.forward
    wrapped.forward = lambda x: plain_forward(x)  # what accelerate's hooks do to a module
    assert not runs_plain_linear_forward(attn.o_proj) and not runs_plain_linear_forward(wrapped)
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    hooked = {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"}
    assert {n for n in adapter.module_names if adapter.forward_mode(n) == "hook"} == hooked
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, scale, width in (("model.layers.0.self_attn.o_proj", 2.0, 64), ("model.layers.1.mlp.down_proj", 1.0, 96)):
            mod = model.get_submodule(name)
            x = torch.randn(5, width, generator=gen)
            want = scale * (x @ mod.weight.T) + x @ adapter.delta_weight(name).T
            torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)


def test_remove_restores_the_class_forward_and_leaves_a_later_wrapper_running_the_base():
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    q = model.model.layers[0].self_attn.q_proj
    k = model.model.layers[0].self_attn.k_proj
    assert "forward" in q.__dict__
    inner = k.forward
    k.forward = lambda x: inner(x)  # wrapped after injection
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapted_k = k(x)
    adapter.remove()
    assert "forward" not in q.__dict__ and runs_plain_linear_forward(q)
    assert adapter.forward_mode("model.layers.0.self_attn.q_proj") is None
    with torch.no_grad():
        torch.testing.assert_close(k(x), x @ k.weight.T, rtol=0, atol=0)
        assert (adapted_k - x @ k.weight.T).abs().max() > 1e-3


def test_a_deep_copy_runs_its_own_weights():
    """The fused forward is a method bound to its module, so a deep copy computes with the copy's weights."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    name = "model.layers.0.self_attn.o_proj"
    mod = clone.get_submodule(name)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), x @ (mod.weight + adapter.delta_weight(name)).T, rtol=1e-5, atol=1e-5)


def test_siblings_fed_different_inputs_fall_back_to_their_own_projection():
    """Sharing is decided by the identity of the input tensor: a model that feeds k another tensor than q still
    gets each module's own ΔW·x."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    xq, xk = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        got = (attn.q_proj(xq), attn.k_proj(xk), attn.v_proj(xq))
        want = [x @ (m.weight + adapter.delta_weight(n)).T for x, (n, m) in
                zip((xq, xk, xq), ((f"model.layers.0.self_attn.{p}", getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj")))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # q computed the group's outputs for xq; k's other input ends the grouping of q/k/v for good.
    assert adapter.forwards.group_nodes.ungrouped == {"model.layers.0.self_attn.q_proj"}
    assert adapter.forwards.group_nodes.outputs == {}
    # The unmatched calls leave a cache entry behind, holding only a weak reference to its input.
    entries = list(adapter.forwards.shared_inputs.values())
    assert entries
    del xq, xk
    assert all(ref() is None for ref, *_ in entries)


QKV = tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))


def _adapted(model, adapter, names, x):
    return [x @ (model.get_submodule(n).weight + adapter.delta_weight(n)).T for n in names]


@pytest.mark.parametrize("kernel, node", [("on", "TinyLoRAGroupFn"), ("off", "TinyLoRALinearBackward")])
def test_siblings_on_one_input_are_one_node_on_the_cpu_kernels(kernel, node):
    """q/k/v and gate/up each give their outputs from one node with the kernels (the first to run computes all);
    without them each module is its own node over one shared projection. o/down are their own node either way."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG, cpu_kernel=kernel))
    layer = model.model.layers[1]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    for mods in ((layer.self_attn.v_proj, layer.self_attn.q_proj, layer.self_attn.k_proj),
                 (layer.mlp.gate_proj, layer.mlp.up_proj)):
        ys = [m(x) for m in mods]
        assert all(node in y.grad_fn.name() for y in ys)
        assert (len({id(y.grad_fn) for y in ys}) == 1) == (kernel == "on")
    assert "TinyLoRALinear" in layer.self_attn.o_proj(x).grad_fn.name()
    assert adapter.forwards.group_nodes.outputs == {} and adapter.forwards.group_nodes.ungrouped == set()


@pytest.mark.parametrize("case", ["called-twice", "x-modified-in-place"])
def test_a_sibling_called_out_of_turn_ends_the_grouping_and_runs_alone(case):
    """Outputs computed ahead are handed out only to the next siblings on the same, unmodified x: q called twice,
    or x written in place between q and k, gets each call its own fresh result."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    attn = model.model.layers[0].self_attn
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = [attn.q_proj(x)]
        want = _adapted(model, adapter, QKV[:1], x)
        if case == "called-twice":
            got.append(attn.q_proj(x))
            want += _adapted(model, adapter, QKV[:1], x)
        else:
            x.mul_(-2.0)
        got += [attn.k_proj(x), attn.v_proj(x)]
        want += _adapted(model, adapter, QKV[1:], x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert adapter.forwards.group_nodes.ungrouped == {QKV[0]} and adapter.forwards.group_nodes.outputs == {}


def test_biases_on_some_siblings_only_run_module_by_module():
    """The group node takes biases on every sibling or none; otherwise each module runs alone, every call."""
    model = tiny_causal_lm("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj.bias = nn.Parameter(torch.randn(attn.k_proj.out_features, generator=torch.Generator().manual_seed(8)))
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    for _ in range(2):
        with torch.no_grad():
            got = [model.get_submodule(n)(x) for n in QKV]
        want = _adapted(model, adapter, QKV, x)
        want[1] = want[1] + attn.k_proj.bias
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert adapter.forwards.group_nodes.ungrouped == set() and adapter.forwards.group_nodes.outputs == {}


@pytest.mark.parametrize("change", ["in-place", "replaced"])
def test_cached_layouts_follow_the_factor_buffers(change):
    """The cached layouts (and the stacked q/k/v Vᵀ) are rebuilt when a factor buffer is written in place, as a
    broadcast from rank 0 does, or replaced, as ``model.to(...)`` does."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
    attn = model.model.layers[0].self_attn
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))

    def check():
        with torch.no_grad():
            for name in names:  # q, k, v share one projection of the same x; o projects its own
                mod = model.get_submodule(name)
                torch.testing.assert_close(mod(x), x @ (mod.weight + adapter.delta_weight(name)).T, rtol=1e-5,
                                           atol=1e-5)

    check()
    for mod in (attn.k_proj, attn.o_proj):
        if change == "in-place":
            mod.tinylora_V.mul_(-2.0)
            mod.tinylora_S.add_(1.0)
        else:
            mod.tinylora_V = mod.tinylora_V * -2.0
            mod.tinylora_S = mod.tinylora_S + 1.0
    check()


@pytest.mark.parametrize("cpu_kernel", ["on", "off"])
def test_under_autocast_the_update_is_float32_rounded_once_and_backpropagates(cpu_kernel):
    """verl runs the actor's forward under autocast: ΔW·x must still be computed in float32 (not in the autocast
    dtype), and the backward must run (it once failed on the bf16 activations autocast saved). The CPU kernel
    rounds the float32 sum of base output and update once; torch ops cast the update once and add it."""
    model = tiny_causal_lm("llama")
    adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG, cpu_kernel=cpu_kernel))
    run(model, torch.bfloat16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in adapter.parameters())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):  # shared, own projection
        mod = model.get_submodule(name)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            got = mod(x)
            with adapter.disable_adapter():
                base = mod(x)
        assert got.dtype == base.dtype == torch.bfloat16
        update = x @ adapter.delta_weight(name).T  # (tokens, out) float32
        assert (got != base).any()
        if cpu_kernel == "on":
            assert_rounded_once_to_bf16(got, base.double() + update.double())
        else:
            torch.testing.assert_close(got, base + update.bfloat16(), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    """HF's (non-reentrant) checkpointing re-runs the fused forwards in backward: same v-gradients."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_causal_lm("llama").train()
        adapter = inject_tinylora(model, TinyLoRAConfig(**CONFIG))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        run(model)
        grads.append([p.grad.clone() for p in adapter.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
