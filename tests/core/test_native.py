"""Native serving arithmetic: simulated tensor-parallel shards of fused layers against a float64 dense reference.

Tolerance: float32 products of rank-2 factors on 64-wide rows, compared with float64: 1e-5 absolute / relative.
"""

import pytest
import torch

from tinylora_verl.core import native
from tinylora_verl.core.factors import dense_delta, mix

TOL = dict(atol=1e-5, rtol=1e-5)


def _factors(gen, out_f, in_f, r=2, u=3):
    U = torch.linalg.qr(torch.randn(out_f, r, generator=gen, dtype=torch.float64))[0].float()  # (out, r)
    V = torch.linalg.qr(torch.randn(in_f, r, generator=gen, dtype=torch.float64))[0].float()  # (in, r)
    S = torch.rand(r, generator=gen) + 0.5  # (r,)
    P = torch.randn(u, r, r, generator=gen) / r ** 0.5  # (u, r, r)
    v = torch.randn(u, generator=gen) * 0.1  # (u,)
    return U, S, V, P, v


def _delta64(U, S, V, P, v):
    return dense_delta(U.double(), S.double(), V.double(), mix(v, P).double())  # (out, in)


def _rank_update(layout, parts, x_local, R=3):
    """One rank's Δy from its buffers (padded to R > r, which must be exact)."""
    buffers = native.empty_buffers(layout, R)
    for j, (U, S, V, P, v) in enumerate(parts):
        native.fill_slice(buffers, layout, j, U, V)
        buffers["core_t"][j].copy_(native.core_t(v, P, S, R))
    native.mix_(buffers)
    out = torch.zeros(x_local.shape[0], layout.out_local)
    return native.add_update(out, x_local, buffers["a"], buffers["ut"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_shards_with_replicated_kv_heads_match_the_dense_update(tp):
    gen = torch.Generator().manual_seed(tp)
    hidden, head, heads, kv_heads = 64, 8, 8, 2  # tp=4 > 2 KV heads: each KV head on 2 ranks
    parts = [_factors(gen, heads * head, hidden), _factors(gen, kv_heads * head, hidden),
             _factors(gen, kv_heads * head, hidden)]
    x = torch.randn(5, hidden, generator=gen)
    dense = [x.double() @ _delta64(*p).T for p in parts]  # q, k, v: (5, out_j)
    for rank in range(tp):
        layout = native.qkv_layout(hidden, head, heads, kv_heads, rank, tp)
        got = _rank_update(layout, parts, x)
        kv_rank = rank // max(1, tp // kv_heads) if tp >= kv_heads else rank
        q_local, kv_local = heads * head // tp, max(1, kv_heads // tp) * head
        want = torch.cat([dense[0][:, rank * q_local:(rank + 1) * q_local],
                          dense[1][:, kv_rank * kv_local:(kv_rank + 1) * kv_local],
                          dense[2][:, kv_rank * kv_local:(kv_rank + 1) * kv_local]], dim=1)
        torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("tp", [1, 2])
def test_gate_up_column_shards_concatenate_to_the_dense_update(tp):
    gen = torch.Generator().manual_seed(10 + tp)
    hidden, inter = 32, 96
    parts = [_factors(gen, inter, hidden), _factors(gen, inter, hidden)]
    x = torch.randn(4, hidden, generator=gen)
    gate, up = (x.double() @ _delta64(*p).T for p in parts)
    local = inter // tp
    for rank in range(tp):
        got = _rank_update(native.column_layout(hidden, [inter, inter], rank, tp), parts, x)
        want = torch.cat([gate[:, rank * local:(rank + 1) * local], up[:, rank * local:(rank + 1) * local]], dim=1)
        torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_partials_sum_to_the_dense_update(tp):
    """o/down: each rank sees its input columns; the layer's all-reduce adds the partial updates."""
    gen = torch.Generator().manual_seed(20 + tp)
    inter, hidden = 128, 48
    part = _factors(gen, hidden, inter)
    x = torch.randn(6, inter, generator=gen)
    local = inter // tp
    total = sum(_rank_update(native.row_layout(inter, hidden, rank, tp), [part],
                             x[:, rank * local:(rank + 1) * local]) for rank in range(tp))
    torch.testing.assert_close(total.double(), x.double() @ _delta64(*part).T, **TOL)


def test_the_update_is_added_in_float32_and_rounded_once():
    gen = torch.Generator().manual_seed(3)
    U, S, V, P, v = _factors(gen, 16, 16)
    layout = native.column_layout(16, [16], 0, 1)
    buffers = native.empty_buffers(layout, 2)
    native.fill_slice(buffers, layout, 0, U, V)
    buffers["core_t"][0].copy_(native.core_t(v, P, S, 2))
    native.mix_(buffers)
    x = torch.randn(3, 16, generator=gen).bfloat16()
    out = torch.randn(3, 16, generator=gen).bfloat16()
    got = native.add_update(out, x, buffers["a"], buffers["ut"])
    want = (out.double() + x.double() @ _delta64(U, S, V, P, v).T).bfloat16()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_buffers_leave_the_output_bit_for_bit():
    layout = native.qkv_layout(32, 8, 4, 2, 0, 1)
    buffers = native.empty_buffers(layout, 2)
    out = torch.randn(4, layout.out_local).bfloat16()
    got = native.add_update(out, torch.randn(4, 32).bfloat16(), buffers["a"], buffers["ut"])
    assert torch.equal(got, out)


def test_wire_format_is_tiny_and_checked():
    v = torch.randn(13, 1, generator=torch.Generator().manual_seed(0))
    step = native.step_tensors(v)
    assert [n for n, _ in step] == [native.V_NAME, native.CHECK_NAME]
    assert sum(t.numel() * t.element_size() for _, t in step) == 13 * 4 + 8
    assert int(step[1][1]) == native.v_checksum(v)
    assert native.v_checksum(v + 1e-7) != native.v_checksum(v)
    assert native.parse_factor_name(native.factor_name("model.layers.0.mlp.up_proj", "P")) == (
        "model.layers.0.mlp.up_proj", "P")
    with pytest.raises(ValueError, match="not a TinyLoRA native install tensor"):
        native.parse_factor_name("tinylora_native/model.layers.0.mlp.up_proj/W")


def test_layouts_refuse_what_does_not_shard_and_ranks_the_engine_lacks():
    with pytest.raises(ValueError, match="output size 10 does not split over tensor-parallel size 4"):
        native.column_layout(8, [10], 0, 4)
    with pytest.raises(ValueError, match="input size 10 does not split over tensor-parallel size 4"):
        native.row_layout(10, 8, 0, 4)
    layout = native.column_layout(8, [8], 0, 1)
    with pytest.raises(ValueError, match="r=4 exceeds the rank the engine allocated \\(2\\)"):
        native.fill_slice(native.empty_buffers(layout, 2), layout, 0, torch.zeros(8, 4), torch.zeros(8, 4))
