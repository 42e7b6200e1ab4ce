"""The one low-rank engine behind svd_merge, resize and extract: jobs in, truncated LoRA factors out.

A `LowRankJob` is neutral: a target name, the target weight's shape, and either low-rank parts (objects
with `.factors()` → (up [out, r], down [r, in·k·k]) and `.rank`, each with a weight) or a dense delta;
plus a rank cap, a rank rule and the output scale. Two routes:

- "factored": Σ wᵢ·upᵢ@downᵢ through `lowrank.factored_svd_parts` (QR of the stacked factors + SVD of the
  R×R core), batched over jobs of equal (out, in·k·k, R). The whole spectrum is exact, so the error
  is the exact tail (or, after a clamp, the exact norm of the stacked difference).
- "dense/randomized" (default for dense jobs) or "dense/exact" (asked for, or sv_cumulative, which needs
  Σσ of the whole spectrum): one job at a time. The sketch is seeded by (seed, job.seed_name), so a
  layer's result does not depend on which other layers run. The error is measured on the dense delta,
  in place, for the factors as they are returned (after the clamp and the cast to `factor_dtype`).

Every job gives one `LayerResult`; `LayerResult.figures()` is the one report schema.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from library.errors import LoraToolsError
from library.lowrank import (
    RotatedSVD,
    SVDResult,
    clamp_quantile,
    dense_sq_norm,
    factored_svd_parts,
    fast_sq_norm,
    generator_for,
    lowrank_fro_norm_sq,
    randomized_svd,
    retained,
    select_rank,
    svd_to_lora,
)
from library.stage_clock import stage

# The one route vocabulary of every report.
FACTORED, DENSE_RANDOMIZED, DENSE_EXACT = "factored", "dense/randomized", "dense/exact"

# Stacked factors of one batch stay under this many elements per side (64 MiB in fp32), so batching
# the 38 Flux `linear1` layers at rank 128 does not need gigabytes at once.
MAX_BATCH_ELEMENTS = 1 << 24


@dataclass
class Factors:
    """Plain low-rank factors as a part of a job (up [out, r], down [r, in·k·k])."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.up.shape[-1])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up, self.down


@dataclass
class EngineSettings:
    """How jobs are run (the same for every job of a run)."""

    oversample: int | None = None  # randomized sketch columns beyond the rank; None = lowrank's default
    power_iters: int = 2
    seed: int = 0
    exact_dense: bool = False  # dense jobs by the exact thin SVD instead of the randomized one
    clamp_quantile: float | None = None  # sd-scripts' clamp of the factors, off unless asked for
    alpha_dtype: torch.dtype = torch.float32  # the dtype alpha is stored in (the scale uses the stored value)
    factor_dtype: torch.dtype | None = None  # cast the factors to this (the save dtype) before measuring the error
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # compute dtype of the factored route
    # Stop the power iterations early when the last one improved the error² by at most this share of it
    # (lowrank.randomized_svd); None = always `power_iters`.
    adaptive_tol: float | None = None
    # Dense jobs' error² by lowrank.fast_sq_norm (float32 chunks, float64 sum: ≈ 1e-7 relative) instead of
    # dense_sq_norm's float64 pass, 3-4× slower; extract's choice, where that pass was a tenth of the run.
    fast_norms: bool = False


@dataclass
class LowRankJob:
    """One target: `parts` [(source, weight)] (low-rank) or `dense` (a matrix or a function making it)."""

    name: str
    shape: tuple[int, ...]
    max_rank: int
    parts: Sequence[tuple[object, float]] = ()
    dense: torch.Tensor | Callable[[], torch.Tensor] | None = None
    method: str | None = None  # rank rule: None (fixed = max_rank) or lowrank.DYNAMIC_METHODS
    param: float | None = None
    input_rank: int | None = None  # never raise the rank above this (resize)
    scale: float = 1.0  # output alpha / rank
    seed_name: str | None = None  # what the sketch's seed derives from with the run's seed (default: name)
    rank_in: int | None = None  # for the report; default Σ rank of the parts
    scratch: bool = False  # the engine may overwrite `dense` (extract's own buffer: no second copy of a layer)
    total_sq: float | None = None  # ‖dense‖_F² (dense_sq_norm) when the caller has measured it already
    # The caller's own exact thin SVD of the job's matrix (singular-space merges have one from their small
    # core): used instead of factored_svd, so the m×R factors are not QR'd a second time. A RotatedSVD forms
    # only the kept vectors.
    svd: Callable[[], SVDResult | RotatedSVD] | None = None

    @property
    def factored(self) -> bool:
        return self.dense is None

    @property
    def in_dim(self) -> int:
        return math.prod(self.shape[1:])

    def parts_rank(self) -> int:
        return sum(int(source.rank) for source, _ in self.parts)


@dataclass
class LayerResult:
    """A job's truncated LoRA factors (CPU, in the target's shape: conv ups [out, k, 1, 1]) and its figures."""

    name: str
    shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    route: str
    spectrum: torch.Tensor  # the singular values computed (whole spectrum on the factored route)
    total_sq: float  # ‖M‖_F², exact
    error_sq: float  # ‖M − (α/k)·up@down‖_F² of the factors as returned
    rank_in: int | None = None
    bias: torch.Tensor | None = None  # a bias delta the caller carries beside the factors (LyCORIS `diff_b`)
    info: dict = field(default_factory=dict)  # the caller's own report fields (input types, weights)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by kohya suffix; alpha in float32 (rank·scale, exact there)."""
        out = {"lora_down.weight": self.down, "lora_up.weight": self.up,
               "alpha": torch.tensor(self.alpha, dtype=torch.float32)}
        if self.bias is not None:
            out["diff_b"] = self.bias
        return out

    @cached_property
    def report(self) -> dict:
        return {**self.figures(), **self.info}

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def relative_error(self) -> float:
        return math.sqrt(max(0.0, self.error_sq) / self.total_sq) if self.total_sq > 0 else 0.0

    @property
    def energy_retained(self) -> float:
        """Share of ‖M‖_F² the result reproduces: 1 − relative_error² (Σσ²_kept/‖M‖² for a plain truncation)."""
        return min(1.0, max(0.0, 1.0 - self.relative_error**2))

    def figures(self) -> dict:
        """The one per-layer report schema (JSON-ready apart from non-finite floats)."""
        S = self.spectrum
        k = self.rank
        other = retained(S, k, total_energy=self.total_sq, error_sq=self.error_sq)
        return {"target": self.name, "shape": list(self.shape), "route": self.route, "rank_in": self.rank_in,
                "rank_out": k, "alpha": self.alpha, "energy_retained": self.energy_retained,
                "fro_retained": other["fro_retained"], "relative_error": self.relative_error,
                "sum_retained": other["sum_retained"], "max_sv_ratio": other["max_sv_ratio"],
                "sigma_max": float(S[0]) if S.numel() else 0.0,
                "sigma_last_kept": float(S[k - 1]) if S.numel() >= k else 0.0}


def run_jobs(jobs: Sequence[LowRankJob], settings: EngineSettings,
             on_done: Callable[[LayerResult], None] | None = None) -> dict[str, LayerResult]:
    """Every job, factored ones batched first; results by job name, `on_done` once per finished job."""
    results: dict[str, LayerResult] = {}

    def done(result: LayerResult) -> None:
        results[result.name] = result
        if on_done:
            on_done(result)

    for batch in batches([j for j in jobs if j.factored and j.svd is None]):
        for result in run_factored_batch(batch, settings):
            done(result)
    for job in jobs:
        if job.svd is not None:
            done(run_given_svd(job, settings))
    for job in jobs:
        if not job.factored:
            done(run_dense(job, settings))
    return results


def batches(jobs: Iterable[LowRankJob]) -> Iterator[list[LowRankJob]]:
    """Jobs grouped by (out, in·k·k, R) so that one batched QR/SVD call serves them all, size-capped."""
    groups: dict[tuple[int, int, int], list[LowRankJob]] = defaultdict(list)
    for job in jobs:
        groups[(job.shape[0], job.in_dim, job.parts_rank())].append(job)
    for (out_dim, in_dim, rank), members in groups.items():
        size = max(1, MAX_BATCH_ELEMENTS // max(max(out_dim, in_dim) * rank, 1))
        for start in range(0, len(members), size):
            yield members[start:start + size]


def _fill_batch(batch: list[LowRankJob], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors of a batch, [B, out, R] and [B, R, in], written in place.

    Per job this is lowrank.stack_factors (w·up side by side, downs on top of each other); filling one
    preallocated tensor avoids a concatenation per layer and a stack per batch, which for a thousand
    small layers cost more than the QRs themselves.
    """
    first = batch[0]
    rank = first.parts_rank()
    big_up = torch.empty(len(batch), first.shape[0], rank, dtype=dtype)
    big_down = torch.empty(len(batch), rank, first.in_dim, dtype=dtype)
    for i, job in enumerate(batch):
        start = 0
        for source, weight in job.parts:
            up, down = source.factors()
            stop = start + up.shape[1]
            torch.mul(up.reshape(up.shape[0], -1), weight, out=big_up[i, :, start:stop])
            big_down[i, start:stop].copy_(down.reshape(down.shape[0], -1))
            start = stop
    return big_up, big_down


def run_factored_batch(batch: list[LowRankJob], settings: EngineSettings) -> list[LayerResult]:
    big_up, big_down = _fill_batch(batch, settings.dtype)
    big_up, big_down = big_up.to(settings.device), big_down.to(settings.device)
    try:
        svd = factored_svd_parts(big_up, big_down, dtype=settings.dtype)
    except torch.linalg.LinAlgError:
        _refuse_nonfinite(batch, big_up, big_down)
        raise
    # NaN/inf in the factors ends up in the spectrum (or in the LinAlgError above): checking the few
    # singular values costs nothing, unlike a pass over every factor.
    finite = torch.isfinite(svd.S).all(dim=-1)
    if not bool(finite.all()):
        _refuse_nonfinite(batch, big_up, big_down)
        raise LoraToolsError("the SVD of this layer overflowed (its values are too large for the compute dtype)",
                             key=batch[int((~finite).nonzero()[0, 0])].name)
    return [_truncated(job, svd.S[i], lambda k, i=i: svd.leading(k, i), big_up[i], big_down[i], settings)
            for i, job in enumerate(batch)]


def run_given_svd(job: LowRankJob, settings: EngineSettings) -> LayerResult:
    """A job whose caller computed the exact thin SVD (`job.svd`): truncated as a factored batch is."""
    svd = job.svd()
    if not bool(torch.isfinite(svd.S).all()):
        raise LoraToolsError(NONFINITE_MESSAGE, key=job.name)
    if hasattr(svd, "leading"):  # a lowrank.RotatedSVD: only the kept singular vectors are formed
        exact = svd.full() if settings.clamp_quantile is not None or settings.factor_dtype is not None else None
        return _truncated(job, svd.S, svd.leading, exact and exact.U * exact.S.unsqueeze(-2), exact and exact.Vh,
                          settings)
    return _truncated(job, svd.S, lambda k: (svd.U[:, :k], svd.Vh[:k]), svd.U * svd.S.unsqueeze(-2), svd.Vh,
                      settings)


def _truncated(job: LowRankJob, S: torch.Tensor, leading, exact_up: torch.Tensor, exact_down: torch.Tensor,
               settings: EngineSettings) -> LayerResult:
    """One layer's LoRA from the exact SVD of its matrix M = exact_up @ exact_down: S is the whole spectrum
    (Σσ² is the exact ‖M‖_F²), `leading(k)` forms only the k kept singular vectors (lowrank.RotatedSVD: a
    dynamic rule often keeps few of R)."""
    total = float(S.double().square().sum())
    k = select_rank(S, job.method, job.param, max_rank=job.max_rank, total_energy=total, input_rank=job.input_rank)
    U_k, Vh_k = leading(k)
    up, down, alpha = svd_to_lora(U_k, S[:k], Vh_k, job.shape, scale=job.scale, alpha_dtype=settings.alpha_dtype)
    # The tail is the exact error (total − kept would cancel badly near full rank).
    error_sq = float(S[k:].double().square().sum())
    if settings.clamp_quantile is not None or settings.factor_dtype is not None:
        up, down = _as_returned(up, down, settings)
        # ‖M − (α/k)·up@down‖² exactly, as the norm of the stacked difference [B | up]·[A; down].
        error_sq = float(lowrank_fro_norm_sq([exact_up, up.reshape(up.shape[0], k).to(exact_up.dtype)],
                                             [exact_down, down.reshape(k, -1).to(exact_up.dtype)],
                                             [1.0, -alpha / k]))
    return LayerResult(job.name, tuple(job.shape), up.cpu(), down.cpu(), alpha, FACTORED, S.cpu(),
                       total, error_sq, job.parts_rank() if job.rank_in is None else job.rank_in)


def run_dense(job: LowRankJob, settings: EngineSettings) -> LayerResult:
    """One dense job. With `job.scratch` the residual is formed in the matrix itself (no second copy)."""
    matrix = job.dense() if callable(job.dense) else job.dense
    matrix = matrix.reshape(job.shape[0], -1)
    total = float(dense_sq_norm(matrix)) if job.total_sq is None else job.total_sq
    if not math.isfinite(total):
        raise LoraToolsError(NONFINITE_MESSAGE, key=job.name)
    cap = min(int(job.max_rank), *matrix.shape)
    if job.input_rank is not None:
        cap = min(cap, int(job.input_rank))
    info: dict = {}
    if settings.exact_dense or job.method == "sv_cumulative":
        # Σσ over the whole spectrum cannot be had from a sketch: sv_cumulative needs the exact SVD.
        with stage("exact svd"):
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        route = DENSE_EXACT
    else:
        generator = generator_for(settings.seed, job.seed_name or job.name, matrix.device)
        U, S, Vh = randomized_svd(matrix, cap, oversample=settings.oversample, n_iter=settings.power_iters,
                                  generator=generator, total_sq=total, adaptive_tol=settings.adaptive_tol, info=info)
        route = DENSE_RANDOMIZED
    k = select_rank(S, job.method, job.param, max_rank=cap, total_energy=total, input_rank=job.input_rank)
    with stage("factors, cast to the save dtype"):
        up, down, alpha = svd_to_lora(U[:, :k], S[:k], Vh[:k], job.shape, scale=job.scale,
                                      alpha_dtype=settings.alpha_dtype)
        spectrum = S.cpu()
        del U, S, Vh
        up, down = _as_returned(up, down, settings)
    # Measured, not estimated: M − (α/k)·up@down of the factors as returned.
    with stage("error of the stored factors"):
        if not job.scratch:
            matrix = matrix.clone()
        matrix.addmm_(up.to(matrix.dtype).reshape(matrix.shape[0], k), down.to(matrix.dtype).reshape(k, -1),
                      alpha=-(alpha / k))
        error_sq = float(fast_sq_norm(matrix) if settings.fast_norms else dense_sq_norm(matrix))
    # Copies, not views: a slice of an SVD factor would keep its whole (oversampled) storage alive.
    return LayerResult(job.name, tuple(job.shape), up.cpu().clone(), down.cpu().clone(), alpha, route, spectrum,
                       total, error_sq, job.rank_in,
                       info=info if settings.adaptive_tol is not None else {})


# The scripts refuse NaN/inf when they read (library/checks.py names the file and tensors); this is the
# engine's own guard for any other caller: an SVD of a non-finite matrix fails or returns garbage.
NONFINITE_MESSAGE = "NaN or inf in this layer's delta: it has no low-rank decomposition"


def _refuse_nonfinite(batch: list[LowRankJob], big_up: torch.Tensor, big_down: torch.Tensor) -> None:
    finite = torch.isfinite(big_up).flatten(1).all(1) & torch.isfinite(big_down).flatten(1).all(1)
    if not bool(finite.all()):
        raise LoraToolsError(NONFINITE_MESSAGE, key=batch[int((~finite).nonzero()[0, 0])].name)


def _as_returned(up: torch.Tensor, down: torch.Tensor, settings: EngineSettings) -> tuple[torch.Tensor, torch.Tensor]:
    if settings.clamp_quantile is not None:
        up, down = clamp_quantile(up, down, settings.clamp_quantile)
    if settings.factor_dtype is not None:
        up, down = up.to(settings.factor_dtype), down.to(settings.factor_dtype)
    return up, down


def summarize(reports: Sequence[dict]) -> dict:
    """The one summary schema over per-layer `figures()` reports (of resize, svd_merge and extract alike)."""
    if not reports:
        return {"layers": 0}
    errors = [r["relative_error"] for r in reports]
    energies = [r["energy_retained"] for r in reports]
    fro = [r["fro_retained"] for r in reports]
    ranks = [r["rank_out"] for r in reports]
    routes: dict[str, int] = {}
    for r in reports:
        routes[r["route"]] = routes.get(r["route"], 0) + 1
    worst = max(reports, key=lambda r: r["relative_error"])
    return {"layers": len(reports), "routes": routes, "ranks": sorted(set(ranks)),
            "rank_out_min": min(ranks), "rank_out_max": max(ranks),
            "relative_error_mean": sum(errors) / len(errors), "relative_error_max": max(errors),
            "worst_layer": worst["target"],
            "energy_retained_mean": sum(energies) / len(energies), "energy_retained_min": min(energies),
            "fro_retained_mean": sum(fro) / len(fro), "fro_retained_min": min(fro)}
