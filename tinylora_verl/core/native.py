"""TinyLoRA served natively by an inference engine: the wire format and the sharded arithmetic, with torch alone.

In ``sync_mode: native`` the rollout engine computes the update itself. Once per server life the trainer installs
each target's frozen factors (``U`` (out, r), ``S`` (r,), ``V`` (in, r), ``P`` (u, r, r) and its tie group); every
step after that it sends only ``v`` (groups, u) and a checksum of it. The engine adds, inside each adapted linear,

    y ← cast(y + ((x V)(Σ M)ᵀ) Uᵀ)       M = Σᵢ vᵢ Pᵢ, Σ = diag(S), in float32, rounded once into y

which is the trainer's forward (:mod:`tinylora_verl.core.ops`). Inference engines fuse linears (q/k/v in one layer,
gate/up in another) and shard them over tensor-parallel ranks, so an engine layer holds several *slices*, each the
rows of one trainer module that this rank computes. Per layer the update is then fixed-shape products over
buffers that hold every slice side by side, padded to the engine's rank ``R >= r`` with zeros (exact)::

    Vt (n·R, in_local)    slice j's Vᵀ rows over this rank's input columns (installed once)
    C_j = (Σ_j M_j) (R, R) recomputed from v at each sync
    A_j = C_j Vt_j         (R, in_local), the mixed projection, recomputed at each sync (not per token)
    Δy = (x Aᵀ) Ut         (tokens, out_local); Ut (n·R, out_local): slice j's Uᵀ in its own output columns

so a forward adds two thin GEMMs per layer (``x Aᵀ``, then an ``addmm`` into y), whatever n.

Column-parallel layers keep all input features and their own output rows of ``U``; row-parallel layers keep their
input rows of ``V`` and all outputs, and their partial ``Δy`` is summed by the layer's own all-reduce (the update is
linear in ``x``). The buffers change only in place, so a compiled graph or a captured CUDA graph reads new values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

PREFIX = "tinylora_native/"
V_NAME = PREFIX + "v"
CHECK_NAME = PREFIX + "check"
FACTOR_PARTS = ("U", "S", "V", "P", "G")


def factor_name(module: str, part: str) -> str:
    """Stream name of one install tensor: ``tinylora_native/<trainer module>/<U|S|V|P|G>``."""
    return f"{PREFIX}{module}/{part}"


def parse_factor_name(name: str) -> tuple[str, str]:
    """``(module, part)`` of an install tensor name; ``ValueError`` naming it when it is not one."""
    module, _, part = name[len(PREFIX):].rpartition("/")
    if not name.startswith(PREFIX) or not module or part not in FACTOR_PARTS:
        raise ValueError(f"{name!r} is not a TinyLoRA native install tensor; expected {PREFIX}<module>/<part> with "
                         f"part in {list(FACTOR_PARTS)}")
    return module, part


def v_checksum(v: torch.Tensor) -> int:
    """A signed 64-bit checksum of ``v``'s float32 bytes (both ends compute it; a mismatch means a wrong v)."""
    data = v.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def step_tensors(v: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The per-step payload: ``v`` (groups, u) float32 and its checksum (int64), last in the stream."""
    v = v.detach().to(dtype=torch.float32).contiguous()  # (groups, u)
    return [(V_NAME, v), (CHECK_NAME, torch.tensor([v_checksum(v)], dtype=torch.int64, device=v.device))]


def install_tensors(factors: Iterable[tuple[str, tuple[torch.Tensor, ...], int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The install stream from ``(module, (U, S, V, P), group)`` triples, float32 (the group as int64)."""
    for module, (U, S, V, P), group in factors:
        for part, t in zip("USVP", (U, S, V, P)):
            yield factor_name(module, part), t.detach().to(torch.float32).contiguous()
        yield factor_name(module, "G"), torch.tensor([group], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- sharded layouts
@dataclass(frozen=True)
class Slice:
    """One trainer module's rows in an engine layer on one rank: ``size`` output rows at ``offset`` in the
    layer's local output, taken from row ``start`` of the module's full ``U``."""

    offset: int
    size: int
    start: int


@dataclass(frozen=True)
class LayerLayout:
    """What one rank of an engine layer computes: its slices, its input width and where its input columns start
    in the full input (row-parallel layers), and its output width."""

    slices: tuple[Slice, ...]
    in_local: int
    in_start: int
    out_local: int


def column_layout(in_features: int, out_sizes: list[int], tp_rank: int, tp_size: int) -> LayerLayout:
    """A column-parallel layer fusing modules of full output sizes ``out_sizes`` (gate/up; one module: plain):
    rank ``k`` holds rows ``[k·s/tp, (k+1)·s/tp)`` of each, side by side."""
    slices, offset = [], 0
    for size in out_sizes:
        if size % tp_size:
            raise ValueError(f"output size {size} does not split over tensor-parallel size {tp_size}")
        local = size // tp_size
        slices.append(Slice(offset, local, tp_rank * local))
        offset += local
    return LayerLayout(tuple(slices), in_features, 0, offset)


def qkv_layout(in_features: int, head_size: int, total_heads: int, total_kv_heads: int, tp_rank: int, tp_size: int,
               v_head_size: Optional[int] = None) -> LayerLayout:
    """vLLM's ``QKVParallelLinear`` on rank ``tp_rank``: ``[q | k | v]``; when there are fewer KV heads than ranks,
    each KV head is replicated over ``tp_size / total_kv_heads`` consecutive ranks."""
    v_head_size = v_head_size or head_size
    heads = total_heads // tp_size
    if tp_size >= total_kv_heads:
        kv_heads, replicas = 1, tp_size // total_kv_heads
    else:
        kv_heads, replicas = total_kv_heads // tp_size, 1
    kv_rank = tp_rank // replicas
    q, k, v = heads * head_size, kv_heads * head_size, kv_heads * v_head_size
    slices = (Slice(0, q, tp_rank * q), Slice(q, k, kv_rank * k), Slice(q + k, v, kv_rank * v))
    return LayerLayout(slices, in_features, 0, q + k + v)


def row_layout(in_features: int, out_features: int, tp_rank: int, tp_size: int) -> LayerLayout:
    """A row-parallel layer (o, down): rank ``k`` reads input columns ``[k·in/tp, (k+1)·in/tp)`` of one module."""
    if in_features % tp_size:
        raise ValueError(f"input size {in_features} does not split over tensor-parallel size {tp_size}")
    local = in_features // tp_size
    return LayerLayout((Slice(0, out_features, 0),), local, tp_rank * local, out_features)


# ---------------------------------------------------------------------------------------------- buffers and math
def empty_buffers(layout: LayerLayout, rank: int, device=None) -> dict[str, torch.Tensor]:
    """Zero buffers of one layer (a zero update until a slice is installed): ``vt`` and ``a`` (n·R, in_local),
    ``core_t`` (n, R, R), ``ut`` (n·R, out_local), float32."""
    n = len(layout.slices)
    kw = dict(dtype=torch.float32, device=device)
    return {"vt": torch.zeros(n * rank, layout.in_local, **kw), "core_t": torch.zeros(n, rank, rank, **kw),
            "a": torch.zeros(n * rank, layout.in_local, **kw), "ut": torch.zeros(n * rank, layout.out_local, **kw)}


def mix_(buffers: dict[str, torch.Tensor]) -> None:
    """``A_j = C_j Vt_j`` for every slice, in place (after the cores or the factors changed)."""
    n, rank, _ = buffers["core_t"].shape
    vt = buffers["vt"].view(n, rank, -1)  # (n, R, in_local)
    buffers["a"].view(n, rank, -1).copy_(torch.bmm(buffers["core_t"].transpose(1, 2), vt))


def fill_slice(buffers: dict[str, torch.Tensor], layout: LayerLayout, j: int, U: torch.Tensor,
               V: torch.Tensor) -> None:
    """Copy slice ``j``'s rows of ``U`` (out, r) and ``V`` (in, r) into the layer's buffers, in place."""
    rank = buffers["core_t"].shape[-1]
    r = U.shape[1]
    if r > rank:
        raise ValueError(f"the trainer's r={r} exceeds the rank the engine allocated ({rank}); restart the rollout "
                         f"with the trainer's r")
    s = layout.slices[j]
    if U.shape[0] < s.start + s.size or V.shape[0] < layout.in_start + layout.in_local:
        raise ValueError(f"factors U {tuple(U.shape)}, V {tuple(V.shape)} do not cover slice {s} of a layer with "
                         f"input columns [{layout.in_start}, {layout.in_start + layout.in_local})")
    rows = slice(j * rank, j * rank + r)
    buffers["vt"][rows].copy_(V[layout.in_start:layout.in_start + layout.in_local].T)  # (r, in_local)
    buffers["ut"][rows].zero_()
    buffers["ut"][rows, s.offset:s.offset + s.size].copy_(U[s.start:s.start + s.size].T)  # (r, size)


def core_t(v: torch.Tensor, P: torch.Tensor, S: torch.Tensor, rank: int) -> torch.Tensor:
    """``(Σ M)ᵀ`` (R, R), zero-padded from (r, r), with ``M = Σᵢ vᵢ Pᵢ`` for ``v`` (u,), ``P`` (u, r, r), ``S`` (r,).

    Summed in float64 and rounded once, as the trainer's ``ops._core_t``."""
    r = P.shape[-1]
    M = torch.einsum("u,urs->rs", v.double(), P.double())  # (r, r)
    out = torch.zeros(rank, rank, dtype=torch.float32, device=P.device)
    out[:r, :r] = (S.double()[:, None] * M).T.float()  # (r, r)
    return out


def add_update(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, ut: torch.Tensor) -> torch.Tensor:
    """``cast(out + (x Aᵀ) Ut)``, in float32 and rounded once into ``out``'s dtype (module doc).

    ``out`` (..., out_local), ``x`` (..., in_local). Branches only on dtypes, which are fixed when a graph is
    traced; float32 activations skip the casts (each is a pass on the CPU's eager path), and a float32 ``out`` (the
    layer's fresh GEMM output, owned by the caller) takes the update in place, sparing an allocation per layer."""
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in_local)
    if x2.dtype != torch.float32:
        x2 = x2.to(torch.float32)
    z = x2 @ a.T  # (tokens, n·R)
    out2 = out.reshape(-1, out.shape[-1])  # (tokens, out_local)
    if out.dtype == torch.float32:
        return out2.addmm_(z, ut).view(out.shape)
    return torch.addmm(out2.to(torch.float32), z, ut).to(out.dtype).view(out.shape)


__all__ = ["CHECK_NAME", "FACTOR_PARTS", "LayerLayout", "PREFIX", "Slice", "V_NAME", "add_update", "column_layout",
           "core_t", "empty_buffers", "factor_name", "fill_slice", "mix_", "install_tensors", "parse_factor_name",
           "qkv_layout", "row_layout", "step_tensors", "v_checksum"]
