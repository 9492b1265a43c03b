"""Frozen factors of TinyLoRA: the top-r SVD of each target weight and the fixed random projections.

For a weight ``W`` (out x in), :func:`top_r_svd` returns ``U`` (out, r), ``S`` (r,), ``V`` (in, r) with
``W ≈ U diag(S) Vᵀ``, computed in float32 whatever the weight's dtype, with a canonical sign, and
:func:`projections` returns ``P`` (u, r, r) with entries ``N(0, 1/r)``, seeded from ``(seed, module name)``.

Why the sign matters: an SVD is unique only up to flipping ``(u_i, v_i)`` together, and
``U D Σ M D Vᵀ ≠ U Σ M Vᵀ`` for a random ``M`` and a sign matrix ``D``. The canonical sign (the entry of
largest magnitude in each column of ``U`` is positive) makes the same base weights and seed always give the
same ΔW, so a saved ``v`` means the same thing on any machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from typing import Callable, Optional, Sequence

import torch

from .config import CPU_KERNELS, _check_choice

logger = logging.getLogger(__name__)

# Below this many rows or columns a float64 full SVD is cheaper than setting up the Krylov iteration.
_FULL_SVD_MAX_DIM = 32
# Block size 2: a pair of nearly equal singular values (σ₃/σ₂ = 0.9976 in SmolLM2's layer 16 up_proj) is resolved
# inside one block instead of needing a polynomial that separates them; blocks of 2 rows also hit MKL's fast
# small-matrix kernels, whereas (n x b) column blocks with 2 <= b <= 8 take a path about 5x slower.
_BLOCK = 2
# Ritz vectors beyond the top r handed to the float64 Rayleigh-Ritz step: it resolves σᵣ against σᵣ₊₁ exactly,
# so the Krylov space only has to contain vᵣ's cluster, and the gap that matters is σᵣ against σᵣ₊₇, not σᵣ₊₁.
_RITZ_EXTRA = 6
# Residual ‖Gvᵢ − θᵢvᵢ‖ of the top-r Ritz pairs relative to θ₁ = σ₁²: 2e-6 puts ΔW within 1e-5 of a float64
# SVD's on every SmolLM2 weight (5e-6: 2.7e-5, 1e-5: 3.5e-5, for ~2% less time; a float32 full SVD is up to
# 1e-4 off). Unlike the residual of float32 subspace iteration it is reachable: it is computed from T, not A.
_RESIDUAL_TOL = 2e-6
# Krylov dimension at which to give up and use a full SVD (SmolLM2 needs at most ~70).
_MAX_KRYLOV_DIM = 1024
# A new block this much smaller than G applied to the last one is round-off: the Krylov space is invariant (exactly
# low rank, or as many equal singular values as the block carries) and cannot be extended.
_BREAKDOWN = 1e-5
# The iteration is hundreds of tiny ops; with several OpenMP threads each pays a fork-join, and on a loaded
# machine a spin-wait: a 576 x 1536 weight took 9 s with 2 threads and 0.02 s with 1. So it runs on one thread,
# except the products with A of a weight this large (Qwen2.5-7B's MLPs) or of a batch of weights (one per thread),
# where threads pay off.
_THREADED_MIN_NUMEL = 1 << 24
# Elements of A converted to float64 at a time in the final products, into one reused buffer: a fresh float64 copy
# of a batch (14 MB for two of SmolLM2's MLP weights, 543 MB for one 18944 x 3584 weight) costs page faults on
# every batch unless the allocator happens to keep it: 11-25 ms a batch here, against ~2 ms for the products.
_CHUNK64_NUMEL = 1 << 17
# Weights from this many elements (512 KiB in float32, an L2 cache) take the CPU kernel's gram_apply: its gain is
# reading A once instead of twice per step, and a smaller A is re-read from L2 anyway (256 x 256: 24 vs 26 µs a
# step, 1536 x 576: 494 vs 714 µs, one thread). Tiny models then never build the kernel for their SVDs.
_KERNEL_MIN_NUMEL = 1 << 17
# Weight elements per batch of same-shape weights (8 MiB in float32): two of SmolLM2's MLP weights, six of its
# q_proj. The products with A are bandwidth-bound; a batch this small stays in cache (SmolLM2's 210 weights: 0.70 s
# with this cap, 0.81 s with 16 MiB, 1.64 s with 32 MiB, 1.15 s one weight at a time), and it is split across the
# intra-op threads, one weight per thread. A 7B model's weights exceed it and go one at a time.
_BATCH_NUMEL = 1 << 21


def _check_rank(weight: torch.Tensor, r: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"TinyLoRA needs a 2-D weight, got shape {tuple(weight.shape)}")
    if r > min(weight.shape):
        raise ValueError(
            f"SVD rank r={r} exceeds min(out, in)={min(weight.shape)} of a weight with shape {tuple(weight.shape)}; "
            f"allowed: 1 <= r <= {min(weight.shape)}"
        )


def canonicalize_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(U[:, i], V[:, i])`` so the entry of largest magnitude in ``U[:, i]`` is positive."""
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx[None, :])).squeeze(0)  # (r,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def full_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r factors from a full ``torch.linalg.svd`` in float32 (the reference; what peers do per module)."""
    _check_rank(weight, r)
    A = weight.detach().to(torch.float32)  # (out, in)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U, V = canonicalize_signs(U[:, :r], Vh[:r].T)
    return U.contiguous(), S[:r].contiguous(), V.contiguous()


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


GramKernel = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _gram_apply(A: torch.Tensor, X: torch.Tensor, tall: bool, threads: int, kernel: Optional[GramKernel] = None
                ) -> torch.Tensor:
    """``X G`` for rows ``X`` (B, b, s) and the Gram ``G`` = AᵀA (tall) or AAᵀ (wide) of the small side s, by the
    CPU kernel's ``gram_apply`` when given (one read of a tall A instead of two), else two batched GEMMs."""
    with _torch_threads(threads):
        if kernel is not None:
            return kernel(A, X, tall)  # (B, b, s)
        return torch.bmm(torch.bmm(X, A.mT), A) if tall else torch.bmm(torch.bmm(X, A), A.mT)  # (B, b, s)


def _block_lanczos(A: torch.Tensor, r: int, k: int, tall: bool, threads: int, kernel: Optional[GramKernel] = None
                   ) -> list[Optional[torch.Tensor]]:
    """Top k Ritz vectors (k, s) of the small-side Gram of each weight in the batch ``A`` (B, out, in) by block
    Lanczos, or None for a weight that did not converge.

    Basis vectors are rows of ``Qt`` (row-major blocks are the fast case, see ``_BLOCK``), reorthogonalized twice
    against all previous ones (classical Gram-Schmidt twice: with one pass float32 loses orthogonality and
    SmolLM2's weights took up to 99 steps, some to wrong vectors). The coefficients of that orthogonalization
    are the projected matrix T = Qᵀ G Q, so the residual of a Ritz pair ``(θ, Qᵀw)`` is ``‖R w_last‖`` with R
    the last block's QR factor, no extra product. The weights of a batch iterate together (every op is a batched
    one: a few hundred ops for the batch instead of for each weight); each is checked at its own predicted depth
    and its Ritz vectors taken as soon as it has converged.
    """
    nb, s, b = A.shape[0], min(A.shape[1:]), _BLOCK
    steps = min(_MAX_KRYLOV_DIM, s) // b - 1
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    Q0, _ = torch.linalg.qr(torch.randn(s, b, generator=gen, dtype=torch.float32))  # (s, b)
    Qt = torch.empty(nb, b * (steps + 1), s, device=A.device)  # (B, d_max, s) basis rows
    # T grows by doubling: zeroing a d_max² buffer (1.3 MB for SmolLM2) cost as much as 5 steps.
    T = torch.zeros(nb, 64, 64, device=A.device)  # (B, ≥ d, ≥ d)
    Qt[:, :b] = Q0.T.to(A.device)
    Qj = Qt[:, :b]  # (B, b, s)
    out: list[Optional[torch.Tensor]] = [None] * nb
    pending = list(range(nb))
    check, last = [-(-k // b)] * nb, [None] * nb  # the first depth with k Ritz vectors
    for j in range(1, steps + 1):
        d = b * j
        Qd = Qt[:, :d]  # (B, d, s)
        W = _gram_apply(A, Qj, tall, threads, kernel)  # (B, b, s)
        scale = W.flatten(1).norm(dim=1)  # (B,)
        C = torch.bmm(W, Qd.mT)  # (B, b, d)
        W = torch.baddbmm(W, C, Qd, alpha=-1)  # (B, b, s)
        C2 = torch.bmm(W, Qd.mT)  # (B, b, d)
        W = torch.baddbmm(W, C2, Qd, alpha=-1)  # (B, b, s)
        Qn, R = torch.linalg.qr(W.mT)  # (B, s, b), (B, b, b)
        Qt[:, d:d + b] = Qn.mT
        Qj = Qt[:, d:d + b]  # (B, b, s)
        if d > T.shape[1]:
            T = torch.nn.functional.pad(T, (0, T.shape[1], 0, T.shape[1]))
        T[:, d - b:d, :d] = C + C2  # this block's row of T up to the diagonal: the lower triangle eigh reads
        breakdown = (R.diagonal(dim1=1, dim2=2).abs().amin(1) <= _BREAKDOWN * scale).tolist()
        due = [i for i in pending if breakdown[i] or j >= check[i] or j == steps]
        if not due:
            continue
        idx = torch.tensor(due, device=A.device)
        theta, w = torch.linalg.eigh(T[idx, :d, :d], UPLO="L")  # ascending
        w = w[..., -k:].flip(-1) if d >= k else None  # (n_due, d, k) top first
        # Only the top r pairs: a block of 2 already carries vᵣ₊₁ along when σᵣ₊₁ ≈ σᵣ.
        res = ([1.0] * len(due) if w is None
               else ((R[idx] @ w[:, d - b:, :r]).norm(dim=1).amax(1) / theta[:, -1]).tolist())
        for n, i in enumerate(due):
            if res[n] <= _RESIDUAL_TOL:
                out[i] = w[n].T @ Qd[i]  # (k, s)
            elif not breakdown[i] and j < steps:
                # The residual falls geometrically with the depth: jump to the predicted depth, at most 8 steps
                # ahead, so the d x d eigh runs a few times rather than every step.
                if last[i] is not None and res[n] < last[i][1]:
                    rate = math.log(res[n] / last[i][1]) / (j - last[i][0])
                    check[i] = j + max(1, min(8, math.ceil(math.log(_RESIDUAL_TOL / res[n]) / rate)))
                else:
                    check[i] = j + 3
                last[i] = (j, res[n])
                continue
            pending.remove(i)
        if not pending:
            break
    return out


def _rayleigh_ritz64(A: torch.Tensor, B: torch.Tensor, r: int, tall: bool, threads: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of each ``A`` (B, out, in) restricted to the row span of ``B`` (B, k, s), in
    float64: ``U`` (B, out, r), ``S`` (B, r), ``V`` (B, in, r)."""
    B = torch.linalg.qr(B.double().mT)[0].mT  # (B, k, s) orthonormal rows in float64
    # Y = B Aᵀ (tall) or B A (wide) in float64, a block of rows of A at a time through one float64 buffer.
    nb, out_f, in_f = A.shape
    step = max(1, _CHUNK64_NUMEL // (nb * in_f))
    buf = torch.empty(nb, min(step, out_f), in_f, dtype=torch.float64, device=A.device)  # (B, rows, in)
    Y = torch.zeros(nb, B.shape[1], out_f if tall else in_f, dtype=torch.float64, device=A.device)  # (B, k, ·)
    with _torch_threads(threads):
        for i in range(0, out_f, step):
            rows = buf[:, :min(step, out_f - i)].copy_(A[:, i:i + step])  # (B, c, in)
            if tall:
                Y[:, :, i:i + step] = torch.bmm(B, rows.mT)  # (B, k, c)
            else:
                Y.baddbmm_(B[:, :, i:i + step], rows)  # (B, k, in)
    # SVD of Yᵀ through the k x k Gram Y Yᵀ: in float64 squaring σ costs nothing that matters, and it is a
    # third of the time of torch.linalg.svd on the tall (big, k) matrix.
    theta, Z = torch.linalg.eigh(Y @ Y.mT)  # (B, k), (B, k, k) ascending
    Z, S = Z[..., -r:].flip(-1), theta[..., -r:].flip(-1).clamp_min(0).sqrt()  # (B, k, r), (B, r)
    big = (Z.mT @ Y).mT / S[:, None, :].clamp_min(torch.finfo(S.dtype).tiny)  # (B, big side, r)
    small = B.mT @ Z  # (B, small side, r)
    return (big, S, small) if tall else (small, S, big)


def _lanczos_svd(A: torch.Tensor, r: int, kernel: Optional[GramKernel] = None
                 ) -> list[Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """``(U, S, V)`` in float64 for each weight of the float32 batch ``A`` (B, out, in), None where unconverged."""
    tall, k = A.shape[1] >= A.shape[2], r + _RITZ_EXTRA
    threads = torch.get_num_threads() if A.numel() >= _THREADED_MIN_NUMEL or A.shape[0] > 1 else 1
    with _torch_threads(1):
        found = _block_lanczos(A, r, k, tall, threads, kernel)
        done = [i for i, B in enumerate(found) if B is not None]
        out: list[Optional[tuple]] = [None] * A.shape[0]
        if done:
            Ad = A if len(done) == len(found) else A[done]  # (B', out, in)
            U, S, V = _rayleigh_ritz64(Ad, torch.stack([found[i] for i in done]), r, tall, threads)
            for n, i in enumerate(done):
                out[i] = (U[n], S[n], V[n])
    return out


def _finish(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, r: int):
    U, V = canonicalize_signs(U[:, :r].float(), V[:, :r].float())
    return U.contiguous(), S[:r].float().contiguous(), V.contiguous()


def top_r_svd(weight: torch.Tensor, r: int, cpu_kernel: str = "auto"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-r SVD ``W ≈ U diag(S) Vᵀ``: float32 block Lanczos, then a float64 Rayleigh-Ritz step.

    Block Lanczos (block 2, full reorthogonalization) on the Gram of the smaller side, ``AᵀA`` or ``AAᵀ``, applied
    as two products with ``A`` (never formed), runs until the top-r Ritz pairs have residual
    ``‖Gvᵢ − θᵢvᵢ‖ ≤ 2e-6 θ₁``. Krylov needs ~1/√gap steps where subspace iteration needs ~1/gap, which is what
    matters on real checkpoints whose spectra are flat (σ₁₇/σ₂ ≈ 0.9 in SmolLM2's MLPs). The float32 iteration
    only has to find a subspace containing the top singular vectors; their separation, which for nearly
    equal σ₂ ≈ σ₃ float32 round-off cannot resolve (a float32 full SVD is up to 1e-4 off in ΔW), is done by
    a Rayleigh-Ritz step on the top r + 6 Ritz vectors with ``A`` in float64. Tiny weights use a float64 full
    SVD; a rank above a quarter of min(out, in) and the unconverged case use a float32 one. The start block
    comes from a fixed seed on the CPU, so the result does not depend on the global RNG. On the CPU the products
    with the Gram run on the C++ kernel's ``gram_apply`` under ``cpu_kernel`` (the policy of
    :class:`~tinylora_verl.core.config.TinyLoRAConfig`'s field: ``auto``, ``on`` or ``off``).

    Returns:
        ``U`` (out, r), ``S`` (r,), ``V`` (in, r), float32, canonical signs.
    """
    return top_r_svd_batch([weight], r, cpu_kernel=cpu_kernel)[0]


def top_r_svd_batch(weights: Sequence[torch.Tensor], r: int, max_batch_numel: int = _BATCH_NUMEL,
                    cpu_kernel: str = "auto", device: Optional[torch.device] = None, threads: Optional[int] = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`top_r_svd` of every weight, weights of one shape and device iterated as one batch.

    What :func:`~tinylora_verl.core.adapter.inject_tinylora` uses: a model has a handful of weight shapes, each
    repeated once per layer. The Krylov iteration is hundreds of small ops, paid once per batch instead of once
    per weight, and the bandwidth-bound products with A run one weight per intra-op thread. Batches hold at most
    ``max_batch_numel`` weight elements, so they stay in cache (copied in float32 into one buffer per shape; the
    Rayleigh-Ritz step reads them in float64 a few rows at a time).
    A weight's factors agree with those computed alone to round-off (its convergence check may fall at another
    depth), both within the same distance of a float64 SVD.

    ``device``: where the iteration runs (default: each weight's own device). Weights are copied there one batch
    at a time, so a model whose weights sit in host memory (verl's rank 0 before FSDP) needs only a batch of device
    memory; factors come back on each weight's device. ``threads``: intra-op threads for the whole call (default:
    the caller's); a Ray actor starts with ``OMP_NUM_THREADS=1``, which would run a 7B model's SVDs on one core.
    """
    _check_choice("cpu_kernel", cpu_kernel, CPU_KERNELS)
    for w in weights:
        _check_rank(w, r)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"`threads` should be an integer >= 1, but the value passed is {threads!r}")
        with _torch_threads(threads):
            return top_r_svd_batch(weights, r, max_batch_numel, cpu_kernel, device)
    out: list[Optional[tuple]] = [None] * len(weights)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((tuple(w.shape), torch.device(device) if device is not None else w.device), []).append(i)
    for (shape, where), idx in groups.items():
        m, n = shape
        if min(m, n) <= _FULL_SVD_MAX_DIM:
            for i in idx:
                U, S, Vh = torch.linalg.svd(weights[i].detach().double(), full_matrices=False)
                out[i] = _finish(U, S, Vh.mT, r)
            continue
        if 4 * (r + _RITZ_EXTRA) > min(m, n):
            for i in idx:
                out[i] = full_svd(weights[i], r)
            continue
        kernel = _cpu_gram_kernel(cpu_kernel) if where.type == "cpu" and m * n >= _KERNEL_MIN_NUMEL else None
        per, start = max(1, max_batch_numel // (m * n)), time.perf_counter()
        # One float32 batch buffer for the group, refilled: a fresh one per batch costs page faults as above.
        buf = torch.empty(min(per, len(idx)), m, n, dtype=torch.float32, device=where)
        for c in range(0, len(idx), per):
            chunk = idx[c:c + per]
            A = buf[:len(chunk)]  # (B, out, in)
            for j, i in enumerate(chunk):
                A[j].copy_(weights[i].detach())
            for i, f in zip(chunk, _lanczos_svd(A, r, kernel)):
                if f is None:
                    logger.warning("top_r_svd: block Lanczos did not converge for a %dx%d weight (or broke down: "
                                   "exactly low rank or repeated singular values); using a full SVD", m, n)
                    out[i] = full_svd(weights[i], r)
                else:
                    out[i] = tuple(t.to(weights[i].device) for t in _finish(*f, r))
        logger.info("top_r_svd: %d weights of %dx%d in %.2f s", len(idx), m, n, time.perf_counter() - start)
    return out


def _cpu_gram_kernel(mode: str) -> Optional[GramKernel]:
    """The CPU kernel's ``gram_apply`` under ``mode``, or None (``off``, or ``auto`` where it does not build)."""
    from ..kernels import load

    kernels = load(mode)
    return None if kernels is None else kernels.gram_apply


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from ``(seed, module name)``: the same on any device, process or traversal order."""
    digest = hashlib.sha256(f"tinylora:{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projections(seed: int, module_name: str, u: int, r: int) -> torch.Tensor:
    """Fixed random projections ``P`` (u, r, r) with i.i.d. ``N(0, 1/r)`` entries.

    The paper does not state P's distribution; ``N(0, 1/r)`` is what every public implementation uses.
    Drawn on the CPU from an explicit generator, then moved by the caller, so every device agrees.
    """
    gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, module_name))
    return torch.randn(u, r, r, generator=gen, dtype=torch.float32) / math.sqrt(r)  # (u, r, r)


def mix(v: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``M = Σᵢ vᵢ Pᵢ`` (r, r) in float32 from ``v`` (u,) and ``P`` (u, r, r)."""
    return torch.einsum("u,urs->rs", v.to(torch.float32), P)  # (r, r)


def dense_delta(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``ΔW = U diag(S) M Vᵀ`` (out, in) in float32."""
    return (U * S) @ M @ V.T  # (out, in)
