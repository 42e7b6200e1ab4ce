"""Low-rank linear algebra shared by resize, SVD-merge and extraction. Pure tensor maths, no file I/O.

- `factored_svd`: the exact thin SVD of Σ wᵢ·upᵢ@downᵢ from QR of the stacked factors and an SVD of the
  small R×R core (R = Σ rᵢ), never forming the out×in matrix. Batched over leading dimensions.
- `lowrank_fro_norm_sq`: the exact ‖Σ wᵢ·upᵢ@downᵢ‖_F² from the two R×R Gram matrices.
- `randomized_svd`: Halko–Martinsson–Tropp sketch with oversampling and re-orthonormalised power
  iterations, seeded, for dense matrices (LoHa/LoKr deltas, checkpoint differences, TIES/DARE merges).
- `stable_seed` / `generator_for`: THE per-(seed, target name) seed of every random draw in loratools
  (sketches here, DARE masks in merge_methods), so a result does not depend on layer order or count.
- `select_rank`: fixed and dynamic (sv_ratio / sv_fro / sv_cumulative) rank rules, energies measured
  against an exact total passed in by the caller.
- `svd_to_lora`: a truncated SVD as (up, down, alpha) with the conv shapes kohya uses.
- `clamp_quantile`: sd-scripts' optional quantile clamp of the factors (off unless asked for).

Conventions: matrices are [..., out, in]; ups [..., out, r]; downs [..., r, in] (conv downs flattened to
[r, in·kh·kw] first, see `flatten_conv`). Singular values come back in descending order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.errors import LoraToolsError
from library.lowrank_rules import DYNAMIC_METHODS
from library.stage_clock import stage


@dataclass
class SVDResult:
    """A thin (possibly truncated) SVD: M ≈ U @ diag(S) @ Vh, shapes [..., m, k], [..., k], [..., k, n]."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def __iter__(self):
        return iter((self.U, self.S, self.Vh))

    def truncate(self, rank: int) -> SVDResult:
        return SVDResult(self.U[..., :, :rank], self.S[..., :rank], self.Vh[..., :rank, :])

    def matrix(self) -> torch.Tensor:
        """The dense product (for tests and small layers only)."""
        return (self.U * self.S.unsqueeze(-2)) @ self.Vh


# ---------------------------------------------------------------------------------------------------------
# Factored SVD of a weighted sum of low-rank products


def flatten_conv(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya LoCon factors (up [out, r, 1, 1], down [r, in, kh, kw]) as the matrices [out, r], [r, in·kh·kw]."""
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


def stack_factors(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[w₁·up₁ | … | w_K·up_K] and [down₁; …; down_K]: their product is Σ wᵢ·upᵢ@downᵢ exactly (kohya's concat)."""
    if len(ups) != len(downs) or not ups:
        raise ValueError(f"need as many ups as downs, at least one (got {len(ups)} and {len(downs)})")
    if weights is None:
        weights = [1.0] * len(ups)
    if len(weights) != len(ups):
        raise ValueError(f"{len(weights)} weights for {len(ups)} factor pairs")
    for up, down in zip(ups, downs):
        if up.shape[-1] != down.shape[-2] or up.shape[:-2] != down.shape[:-2]:
            raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} do not form a product")
    big_up = torch.cat([up.to(dtype) * float(w) for up, w in zip(ups, weights)], dim=-1)
    big_down = torch.cat([down.to(dtype) for down in downs], dim=-2)
    return big_up, big_down


def factored_svd(ups: Sequence[torch.Tensor] | torch.Tensor, downs: Sequence[torch.Tensor] | torch.Tensor,
                 weights: Sequence[float] | None = None, *, dtype: torch.dtype = torch.float32) -> SVDResult:
    """Exact thin SVD of Σ wᵢ·upᵢ@downᵢ without forming the out×in matrix.

    ups[i] is [..., out, rᵢ], downs[i] is [..., rᵢ, in] (same leading batch dims, e.g. all 38 Flux
    `linear1` layers at once). A single up/down tensor pair is accepted too. QR of the stacked up
    (out×R) and of the stacked downᵀ (in×R) reduces the problem to the R×R core R_up·R_downᵀ, whose SVD
    is done in float64 (cheap at R×R and removes any doubt about the core's accuracy). The QRs run
    in `dtype` (float32 by default: Householder QR is backward stable). Returns k = min(R, out, in)
    singular triplets. When R ≥ min(out, in) the factors save nothing and the dense route is used.
    """
    if isinstance(ups, torch.Tensor):
        ups, downs = [ups], [downs]
    return factored_svd_parts(*stack_factors(ups, downs, weights, dtype), dtype=dtype).full()


@dataclass
class RotatedSVD:
    """A factored SVD kept as U = q_up·cu, Vh = cvh·q_downᵀ (S in `dtype`), so that a caller who keeps k of the R
    directions forms only k singular vectors: the rotations cost out·R·k instead of out·R² (a resize to 32 of
    a rank-128 file, or a dynamic rule keeping 7, needs a fraction of them)."""

    q_up: torch.Tensor  # [..., out, R]
    cu: torch.Tensor  # [..., R, R'] float64
    S: torch.Tensor  # [..., R']
    cvh: torch.Tensor  # [..., R', R] float64
    q_down: torch.Tensor  # [..., in, R]

    def leading(self, k: int, index=...) -> tuple[torch.Tensor, torch.Tensor]:
        """(U[:, :k], Vh[:k]) of batch entry `index` (all entries with the default)."""
        q_up, cu, cvh, q_down = self.q_up[index], self.cu[index], self.cvh[index], self.q_down[index]
        U = q_up @ cu[..., :k].to(q_up.dtype)
        Vh = cvh[..., :k, :].to(q_down.dtype) @ q_down.transpose(-1, -2)
        return U, Vh

    def full(self) -> SVDResult:
        U, Vh = self.leading(self.S.shape[-1])
        return SVDResult(U, self.S, Vh)


def factored_svd_parts(big_up: torch.Tensor, big_down: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> RotatedSVD:
    """`factored_svd` of stacked factors big_up [..., out, R] @ big_down [..., R, in], before the rotations."""
    out_dim, rank, in_dim = big_up.shape[-2], big_up.shape[-1], big_down.shape[-1]
    if rank >= min(out_dim, in_dim):
        U, S, Vh = torch.linalg.svd(big_up @ big_down, full_matrices=False)
        eye = torch.eye(S.shape[-1], dtype=torch.float64, device=S.device).expand(*S.shape, S.shape[-1])
        return RotatedSVD(U, eye, S, eye, Vh.transpose(-1, -2))
    q_up, r_up = torch.linalg.qr(big_up)  # [.., out, R], [.., R, R]
    q_down, r_down = torch.linalg.qr(big_down.transpose(-1, -2))  # [.., in, R], [.., R, R]
    core = r_up.double() @ r_down.double().transpose(-1, -2)
    cu, S, cvh = torch.linalg.svd(core, full_matrices=False)
    return RotatedSVD(q_up, cu, S.to(dtype), cvh, q_down)


def lowrank_fro_norm_sq(ups: Sequence[torch.Tensor] | torch.Tensor, downs: Sequence[torch.Tensor] | torch.Tensor,
                    weights: Sequence[float] | None = None) -> torch.Tensor:
    """Exact ‖Σ wᵢ·upᵢ@downᵢ‖_F² (float64, one value per batch entry) from the R×R Gram matrices.

    ‖BA‖_F² = tr(AᵀBᵀBA) = Σ (BᵀB) ⊙ (AAᵀ): both Grams are symmetric, so the trace of their product is
    the sum of their elementwise product. float64 keeps the cancellation between terms harmless.
    """
    if isinstance(ups, torch.Tensor):
        ups, downs = [ups], [downs]
    big_up, big_down = stack_factors(ups, downs, weights, torch.float64)
    gram_up = big_up.transpose(-1, -2) @ big_up
    gram_down = big_down @ big_down.transpose(-1, -2)
    return (gram_up * gram_down).sum(dim=(-1, -2)).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------------------
# Randomized SVD of dense matrices


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, name) by sha256 (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` whose stream depends only on (seed, name): stable across runs and orders."""
    return _generator(stable_seed(seed, name), device)


def _generator(seed: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_svd(matrix: torch.Tensor, rank: int, *, oversample: int | None = None, n_iter: int = 2,
                   generator: torch.Generator | None = None, seed: int = 0, total_sq: float | None = None,
                   adaptive_tol: float | None = None, info: dict | None = None) -> SVDResult:
    """Top-`rank` SVD of a dense [..., m, n] matrix by a randomized range finder (Halko et al. 2011).

    Sketch size l = rank + oversample (default oversample = max(rank, 10): torch.svd_lowrank's q is
    the *total* sketch size, and tools that pass q = rank get no oversampling at all). Each power
    iteration re-orthonormalises both sides so that float32 does not lose the small singular
    directions. The Gaussian test matrix comes from `generator` (or one seeded with `seed` on the
    matrix's device), so a run is reproducible. When l reaches min(m, n) the exact thin SVD is cheaper
    and is used instead. Works batched over leading dimensions and on any device.

    Every half step ends with Z = Mᵀ·Q and its QR Z = Q_z·R_z, so M ≈ Q·Qᵀ·M = Q·R_zᵀ·Q_zᵀ: the final
    factors come from the SVD of the l×l R_z (no extra pass over M), and the singular values of R_z
    are those of Qᵀ·M, i.e. the energy s = Σ_{i≤rank} σ̂ᵢ² the current basis captures.

    Adaptive (`adaptive_tol` with `total_sq` = ‖M‖_F², one 2-D matrix), `n_iter` staying the most, and
    `info["power_iters"]` saying how many ran. After each power iteration, stop when either
    - the measured gap allows it: r = √(total_sq − Σ_all σ̂²) (the energy outside the sketch) bounds
      σ_{l+1} from above, and subspace iteration loses a share ≈ (σ_{l+1}/σ_k)^(4q+2) of the kept
      energy after q iterations; stop once (r/σ̂_k)^(4q+2) ≤ adaptive_tol (a delta of rank ≤ k over
      a noise floor: one iteration); or
    - the last iteration improved the rank-k error² (total_sq − s) by at most `adaptive_tol` of it.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    m, n = matrix.shape[-2], matrix.shape[-1]
    if oversample is None:
        oversample = max(rank, 10)
    sketch = rank + max(0, int(oversample))
    if sketch >= min(m, n):
        with stage("small svd (exact, thin)"):
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        if info is not None:
            info["power_iters"] = 0
        return SVDResult(U, S, Vh).truncate(rank)
    # Sketch the shorter side's complement: work on Mᵀ when m < n so the basis lives in the small space.
    transposed = m < n
    mat = matrix.transpose(-1, -2) if transposed else matrix
    if generator is None:
        generator = _generator(seed, matrix.device)
    adaptive = adaptive_tol is not None and total_sq is not None and matrix.dim() == 2
    with stage("sketch"):
        omega = torch.randn((*mat.shape[:-2], mat.shape[-1], sketch), generator=generator, device=matrix.device,
                            dtype=matrix.dtype)
        y = mat @ omega
        del omega
    with stage("qr"):
        q = _orthonormal(y)
    del y

    def right_side(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with stage("power iterations (matmul)"):
            z = mat.transpose(-1, -2) @ q  # [.., n, l]
        with stage("qr"):
            return torch.linalg.qr(z)

    qz, rz = right_side(q)
    done, captured = 0, None
    for _ in range(n_iter):
        if adaptive:
            with stage("small svd"):
                sv = torch.linalg.svdvals(rz).double()
            kept = float(sv[:rank].square().sum())
            if done > 0:
                outside = math.sqrt(max(0.0, total_sq - float(sv.square().sum())))
                gap_small = float(sv[rank - 1]) > 0 and (outside / float(sv[rank - 1])) ** (4 * done + 2) <= adaptive_tol
                if gap_small or kept - captured <= adaptive_tol * max(0.0, total_sq - kept):
                    break
            captured = kept
        with stage("power iterations (matmul)"):
            y = mat @ qz
        with stage("qr"):
            q = _orthonormal(y)
        del y
        qz, rz = right_side(q)
        done += 1
    with stage("small svd"):
        ub, S, vbh = torch.linalg.svd(rz.transpose(-1, -2), full_matrices=False)  # Qᵀ·M = R_zᵀ·Q_zᵀ
        U = q @ ub
        Vh = vbh @ qz.transpose(-1, -2)
    if info is not None:
        info["power_iters"] = done
    result = SVDResult(U, S, Vh).truncate(rank)
    if transposed:
        result = SVDResult(result.Vh.transpose(-1, -2), result.S, result.U.transpose(-1, -2))
    return result


def dense_sq_norm(matrix: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """Exact ‖M‖_F² in float64 per batch entry: the reference every retained-energy figure is measured against.

    Accumulated a block of about `block` elements at a time: vector_norm(dtype=float64) converts its whole
    input to float64 first, which for a large layer (1280×2560×3×3) would be twice the layer's float32 size
    on top of the peak extraction keeps low. Any tensor of ≥ 2 dims (a 1-D one: reshape(1, -1)).
    """
    flat = matrix.reshape(*matrix.shape[:-2], -1)
    step = max(1, block // max(1, math.prod(flat.shape[:-1])))
    total = torch.zeros(flat.shape[:-1], dtype=torch.float64, device=matrix.device)
    for start in range(0, flat.shape[-1], step):
        total += torch.linalg.vector_norm(flat[..., start:start + step], dim=-1, dtype=torch.float64).square()
    return total


def fast_sq_norm(matrix: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """‖M‖_F² (a float64 scalar) of a whole tensor: float32 norms of chunks of `chunk` elements, summed in float64.

    Within float32's own rounding of the inputs (relative error ≈ 1e-7, against dense_sq_norm's 1e-16)
    at 3-4× the speed: dense_sq_norm widens every element to float64 first, which made it extract's
    costliest pass after the matmuls. Good for figures reported to a few digits (retained energy, errors
    measured on the residual itself, so there is no cancellation to amplify it).
    """
    flat = matrix.reshape(-1)
    whole = flat.numel() - flat.numel() % chunk
    total = torch.linalg.vector_norm(flat[:whole].view(-1, chunk), dim=1).double().square().sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:]).double().square()
    return total


def relative_error(total_energy: torch.Tensor | float, kept: torch.Tensor) -> torch.Tensor:
    """‖M − M_k‖_F / ‖M‖_F for an orthogonal-projection truncation M_k with singular values `kept`.

    Exact for both the factored and the randomized SVD because M_k = P·M with P an orthogonal projector,
    so ‖M − PM‖² = ‖M‖² − ‖PM‖² = ‖M‖² − Σ kept². 0 for an all-zero matrix.
    """
    total = torch.as_tensor(total_energy, dtype=torch.float64)
    kept_sq = kept.double().square().sum(dim=-1)
    resid = (total - kept_sq).clamp_min(0.0)
    return torch.where(total > 0, (resid / total.clamp_min(1e-300)).sqrt(), torch.zeros_like(total))


def retained(S: torch.Tensor, rank: int, *, total_energy: float | None = None,
             error_sq: float | None = None) -> dict[str, float]:
    """Per-layer figures for keeping the first `rank` of the singular values `S` (1-D, descending).

    fro_retained = ‖M_k‖_F/‖M‖_F and relative_error = ‖M − M_k‖_F/‖M‖_F against `total_energy` = ‖M‖_F² (exact,
    from the caller; defaults to Σσ² of S when S is the full spectrum); sum_retained = Σσ_{≤k}/Σσ over S
    (sd-scripts' "sum(S) retained"); max_sv_ratio = σ₀/σ_{k−1} (inf when σ_{k−1} = 0). An all-zero layer
    retains everything with no error. `error_sq` = ‖M − M_k‖² when the caller knows it more accurately
    (the tail Σσ²_{>k} of a full spectrum, or a measured residual): total − kept cancels badly near full rank.
    """
    S = S.detach().double().cpu().reshape(-1)
    rank = max(0, min(int(rank), S.numel()))
    total = float(S.square().sum()) if total_energy is None else float(total_energy)
    kept = S[:rank]
    if error_sq is None:
        err = float(relative_error(total, kept))
    else:
        err = (max(0.0, float(error_sq)) / total) ** 0.5 if total > 0 else 0.0
    if total > 0:
        fro = min(1.0, float(kept.square().sum()) / total) ** 0.5
    else:
        fro = 1.0
    s_sum = float(S.sum())
    last = float(kept[-1]) if rank else 0.0
    return {"fro_retained": fro, "relative_error": err,
            "sum_retained": float(kept.sum()) / s_sum if s_sum > 0 else 1.0,
            "max_sv_ratio": float(kept[0]) / last if last > 0 else (1.0 if total == 0 else math.inf)}


# ---------------------------------------------------------------------------------------------------------
# Rank selection


def select_rank(S: torch.Tensor, method: str | None = None, param: float | None = None, *, max_rank: int | None = None,
                total_energy: float | None = None, input_rank: int | None = None) -> int:
    """The rank to keep for one layer with singular values `S` (descending, 1-D).

    - fixed (method None): max_rank (None: no cap).
    - sv_ratio p: the number of σᵢ > σ₀/p (strict, as sd-scripts).
    - sv_cumulative p: the fewest leading σ with Σσ_{≤k}/Σσ ≥ p.
    - sv_fro p: the fewest leading σ with Σσ²_{≤k}/‖M‖_F² ≥ p², where ‖M‖_F² is `total_energy` (exact, from
      the caller) when given, else Σσ² of `S`. A truncated spectrum (randomized SVD) therefore never
      over-reports retained energy.

    The dynamic formulas are sd-scripts' except that we keep the rank the criterion asks for;
    sd-scripts adds one more (a bug fixed upstream in PR #2194). The result is then capped by
    `max_rank` (--new_rank caps a dynamic rank), by `input_rank` (a rank is never raised) and by
    len(S), and is at least 1 (an all-zero layer keeps a zero rank-1 pair so that the module stays).
    """
    S = S.detach().double().cpu().reshape(-1)
    cap = S.numel() if max_rank is None else min(int(max_rank), S.numel())
    if input_rank is not None:
        cap = min(cap, int(input_rank))
    if cap < 1:
        return 1
    if method is None:
        return cap
    if method not in DYNAMIC_METHODS:
        raise LoraToolsError(f"unknown dynamic method {method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    if param is None or not math.isfinite(param) or param < 0:
        raise LoraToolsError(f"--dynamic_param must be a finite number ≥ 0 for {method}, got {param}")
    if S.numel() == 0 or float(S[0]) <= 0.0:
        return 1
    if method == "sv_ratio":
        if param == 0:
            return 1
        threshold = float(S[0]) / param
        k = int(S.gt(threshold).sum())
    elif method == "sv_cumulative":
        if total_energy is not None and float(S.square().sum()) < float(total_energy) * (1 - 1e-6):
            raise LoraToolsError("sv_cumulative needs the full spectrum (Σσ), but only a truncated one is available")
        fractions = torch.cumsum(S, 0) / S.sum()
        k = _first_reaching(fractions, param) + 1
    else:
        total = float(total_energy) if total_energy is not None else float(S.square().sum())
        fractions = torch.cumsum(S.square(), 0) / total
        k = _first_reaching(fractions, param * param) + 1
    return max(1, min(k, cap))


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """Index of the first fraction ≥ target (len(fractions) when none does), as torch.searchsorted(left)."""
    hits = torch.nonzero(fractions >= target)
    return int(hits[0, 0]) if hits.numel() else fractions.numel()


# ---------------------------------------------------------------------------------------------------------
# Back to LoRA factors


def representable_alpha(alpha: float, dtype: torch.dtype) -> float:
    """The value `alpha` takes once stored in `dtype` (the scale must be computed from what is stored)."""
    return float(torch.tensor(float(alpha), dtype=torch.float64).to(dtype).double())


def svd_to_lora(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, shape: Sequence[int] | None = None, *,
                scale: float = 1.0, alpha_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, alpha) with (alpha/k)·up@down = U·diag(S)·Vh, k = len(S) (pass an already truncated SVD).

    alpha = scale·k rounded to `alpha_dtype`; the factors are divided by the scale that alpha really
    stores, so the product is exact whatever the save dtype (default scale 1 ⇒ alpha = k, the convention
    of sd-scripts' svd_merge/extract and PEFT's SVD merges; resize passes the input's alpha/rank so
    ss_network_alpha keeps its meaning). √σ goes into both factors (balanced), which keeps fp16/bf16
    storage far from overflow, unlike putting all of σ into up. `shape` is the target weight's shape:
    a 4-D one gives down [k, in, kh, kw] and up [out, k, 1, 1]. One layer (no batch).
    """
    if S.dim() != 1:
        raise ValueError("svd_to_lora takes one layer; index the batch first")
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    rank = S.numel()
    if rank < 1:
        raise ValueError("svd_to_lora needs at least one singular triplet")
    alpha = representable_alpha(scale * rank, alpha_dtype)
    stored_scale = alpha / rank
    root = (S.double().clamp_min(0) / stored_scale).sqrt().to(U.dtype)
    up = U[:, :rank] * root.unsqueeze(0)
    down = root.unsqueeze(1) * Vh[:rank]
    if shape is not None and len(shape) == 4:
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return up.contiguous(), down.contiguous(), alpha


# ---------------------------------------------------------------------------------------------------------
# Optional quantile clamp


def clamp_quantile(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' `--clamp_quantile`: clip both factors to ±(the `quantile` of their pooled signed entries).

    Off by default everywhere: it changes the result beyond the Eckart–Young optimum. Returns the clipped
    factors; the bound is `quantile_bound(up, down, quantile)`.
    """
    bound = quantile_bound(up, down, quantile)
    return up.clamp(-bound, bound), down.clamp(-bound, bound)


def quantile_bound(up: torch.Tensor, down: torch.Tensor, quantile: float) -> float:
    """The `quantile` of the pooled signed entries of both factors, interpolated linearly like torch.quantile.

    kthvalue instead of torch.quantile, which refuses inputs over 2²⁴ elements (sd-scripts issue #1485).
    """
    if not 0.0 < quantile <= 1.0:
        raise LoraToolsError(f"--clamp_quantile must be in (0, 1], got {quantile}")
    pooled = torch.cat([up.reshape(-1), down.reshape(-1)]).float()
    pos = quantile * (pooled.numel() - 1)
    lo_i, frac = int(math.floor(pos)), pos - math.floor(pos)
    lo_v = pooled.kthvalue(lo_i + 1).values
    hi_v = pooled.kthvalue(min(lo_i + 2, pooled.numel())).values
    return float(lo_v + (hi_v - lo_v) * frac)


def is_conv_kernel(shape: Sequence[int]) -> bool:
    """A k×k convolution (not 1×1): the layers that --new_conv_rank / --conv_dim govern."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def rank_cap(shape: Sequence[int], settings) -> int:
    """`settings.new_conv_rank` for k×k convs, `settings.new_rank` for Linear and 1×1 convs (sd-scripts' rule)."""
    if is_conv_kernel(shape) and settings.new_conv_rank is not None:
        return settings.new_conv_rank
    return settings.new_rank


def check_rank_settings(new_rank: int | None, new_conv_rank: int | None, dynamic_method: str | None,
                        dynamic_param: float | None) -> None:
    """The user-facing checks of --new_rank/--new_conv_rank/--dynamic_method/--dynamic_param shared by scripts."""
    if new_rank is None or new_rank < 1:
        raise LoraToolsError(f"--new_rank must be at least 1, got {new_rank}")
    if new_conv_rank is not None and new_conv_rank < 1:
        raise LoraToolsError(f"--new_conv_rank must be at least 1, got {new_conv_rank}")
    if dynamic_method is not None:
        if dynamic_method not in DYNAMIC_METHODS:
            raise LoraToolsError(f"--dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}")
        if dynamic_param is None or not math.isfinite(dynamic_param) or dynamic_param < 0:
            raise LoraToolsError(f"--dynamic_method {dynamic_method} needs a --dynamic_param ≥ 0")
