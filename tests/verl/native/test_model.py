"""The vLLM-side receiver on stand-in vLLM layers (same class names, attributes and ``quant_method.apply`` call as
vLLM's): fused q/k/v and gate/up outputs equal the trainer's adapted modules, and every refusal path.

Tolerance: float32 on both sides, the same products in another order: 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinylora_verl.core import native
from tinylora_verl.core.adapter import inject_tinylora
from tinylora_verl.core.config import TinyLoRAConfig
from tinylora_verl.verl.native.model import attach, state_of

HIDDEN, HEAD, HEADS, KV_HEADS, INTER = 32, 8, 4, 2, 48


class Unquantized:
    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class _Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.quant_method, self.tp_rank, self.tp_size = Unquantized(), 0, 1

    def forward(self, x):
        return self.quant_method.apply(self, x), None


class QKVParallelLinear(_Linear):
    def __init__(self, weight):
        super().__init__(weight)
        self.input_size, self.head_size, self.total_num_heads, self.total_num_kv_heads = HIDDEN, HEAD, HEADS, KV_HEADS


class MergedColumnParallelLinear(_Linear):
    def __init__(self, weight):
        super().__init__(weight)
        self.input_size, self.output_sizes = HIDDEN, [INTER, INTER]


class RowParallelLinear(_Linear):
    def __init__(self, weight):
        super().__init__(weight)
        self.output_size_per_partition, self.input_size_per_partition = weight.shape


def _trainer():
    gen = torch.Generator().manual_seed(0)
    lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
    torch.manual_seed(0)
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.q_proj, layer.self_attn.k_proj = lin(HIDDEN, HEADS * HEAD), lin(HIDDEN, KV_HEADS * HEAD)
    layer.self_attn.v_proj, layer.self_attn.o_proj = lin(HIDDEN, KV_HEADS * HEAD), lin(HEADS * HEAD, HIDDEN)
    layer.mlp = nn.Module()
    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj = lin(HIDDEN, INTER), lin(HIDDEN, INTER), lin(INTER, HIDDEN)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    adapter = inject_tinylora(model, TinyLoRAConfig(tie_mode="tiled", tie_size=3, u=2, cpu_kernel="off"))
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, adapter


def _served(trainer):
    a, m = trainer.model.layers[0].self_attn, trainer.model.layers[0].mlp
    layer = nn.Module()
    layer.self_attn, layer.mlp = nn.Module(), nn.Module()
    layer.self_attn.qkv_proj = QKVParallelLinear(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    layer.self_attn.o_proj = RowParallelLinear(a.o_proj.weight.clone())
    layer.mlp.gate_up_proj = MergedColumnParallelLinear(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
    layer.mlp.down_proj = RowParallelLinear(m.down_proj.weight.clone())
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer])
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    model.loaded = []
    model.load_weights = lambda weights: model.loaded.extend(n for n, _ in weights) or set()
    return model


def _stream(adapter):
    install = list(native.install_tensors((n, adapter.factors(n), adapter.group_of(n)) for n in adapter.module_names))
    v = torch.stack([p.detach() for p in adapter.parameters()])  # (groups, u)
    return install, native.step_tensors(v)


def test_fused_layers_serve_each_modules_exact_update():
    trainer, adapter = _trainer()
    served = _served(trainer)
    state = attach(served, rank=2)
    install, step = _stream(adapter)
    served.load_weights(install + [("model.embed_tokens.weight", torch.zeros(1))] + step)
    assert served.loaded == ["model.embed_tokens.weight"], "only non-TinyLoRA names reach vLLM's loader"
    assert len(state.installed) == 7 and state.syncs == 1 and state.checksum == int(step[1][1])
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    a, m, s = trainer.model.layers[0].self_attn, trainer.model.layers[0].mlp, served.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(s.self_attn.qkv_proj(x)[0], torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], 1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.mlp.gate_up_proj(x)[0], torch.cat([m.gate_proj(x), m.up_proj(x)], 1),
                                   atol=1e-5, rtol=1e-5)
        h = torch.randn(5, INTER, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(s.mlp.down_proj(h)[0], m.down_proj(h), atol=1e-5, rtol=1e-5)
        # A later step: v alone moves the served update.
        for p in adapter.parameters():
            p.mul_(-2)
        served.load_weights(_stream(adapter)[1])
        torch.testing.assert_close(s.self_attn.qkv_proj(x)[0], torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], 1),
                                   atol=1e-5, rtol=1e-5)
    assert state.syncs == 2 and attach(served, rank=2) is state


def test_v_before_any_install_is_refused():
    trainer, adapter = _trainer()
    served = _served(trainer)
    attach(served, rank=2)
    with pytest.raises(RuntimeError, match="holds no install"):
        served.load_weights(_stream(adapter)[1])


def test_non_finite_v_and_a_wrong_checksum_are_refused():
    trainer, adapter = _trainer()
    served = _served(trainer)
    attach(served, rank=2)
    install, (v, check) = _stream(adapter)
    bad = v[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="refused a non-finite v"):
        served.load_weights(install + [(native.V_NAME, bad), (native.CHECK_NAME, torch.tensor([native.v_checksum(bad)]))])
    with pytest.raises(RuntimeError, match="differs from the trainer's"):
        served.load_weights([v, (native.CHECK_NAME, check[1] + 1)])
    with pytest.raises(RuntimeError, match="carried no v"):
        served.load_weights([check])


def test_install_names_that_match_no_layer_or_lack_a_part_are_refused():
    trainer, adapter = _trainer()
    served = _served(trainer)
    attach(served, rank=2)
    install, step = _stream(adapter)
    renamed = [(n.replace("self_attn.q_proj", "self_attn.x_proj"), t) for n, t in install]
    with pytest.raises(ValueError, match="maps to no adapted vLLM layer"):
        served.load_weights(renamed + step)
    partial = [(n, t) for n, t in install if not n.endswith("/P")]
    with pytest.raises(RuntimeError, match=r"lacks \['P'\]"):
        served.load_weights(partial + step)


def test_a_model_without_hooks_and_a_bad_rank_fail_clearly():
    trainer, _ = _trainer()
    with pytest.raises(RuntimeError, match="no TinyLoRA native hooks"):
        state_of(_served(trainer))
    with pytest.raises(ValueError, match="rank should be an integer >= 1, but the value passed is 0"):
        attach(_served(trainer), rank=0)
