"""Resize the adapters of a LoRA file to a new (fixed or per-layer dynamic) rank. Pure maths, no file I/O.

- LoRA / LoCon / Tucker: the exact factored SVD of (α/r)·up@down (QR of up and downᵀ, SVD of the r×r core),
  batched over layers of equal (out, in·k·k, r). The dense delta is never formed, every singular value is
  exact, so the dynamic rules and the retained-energy figures are exact too.
- LoHa / LoKr / full diff: their delta is formed per layer and factored by a seeded randomized SVD; the
  figures are measured against the exact norm of that delta (sv_cumulative needs Σσ, so it uses the exact
  thin SVD for these layers). The output is a plain LoRA.
- DoRA: the change it makes depends on the base weight; with `base_weight` given, the module's full effect
  W_dora − W is factored like a dense delta (plain LoRA out), otherwise the module is refused.

The effective scale is kept: new alpha = (old alpha / old rank)·new rank (sd-scripts' rule), rounded to the
save dtype, and the factors use the stored alpha, so (alpha/k)·up@down is the optimal rank-k truncation.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.lowrank import (
    check_rank_settings,
    dense_sq_norm,
    factored_svd,
    is_conv_kernel,
    randomized_svd,
    rank_cap,
    retained,
    seeded_generator,
    select_rank,
    svd_to_lora,
)
from library.merge_methods import stable_seed
from networks.base import Adapter

# Stacked factors of one batch stay under this many elements (≈256 MiB in fp32).
MAX_BATCH_ELEMENTS = 1 << 26


@dataclass
class ResizeSettings:
    new_rank: int = 4
    new_conv_rank: int | None = None  # k×k convs; None = new_rank (sd-scripts)
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    remove_conv: bool = False  # drop k×k conv modules from the output
    remove_linear: bool = False  # drop Linear and 1×1 conv modules from the output
    oversample: int | None = None  # randomized SVD (dense inputs); None = max(rank, 10)
    power_iters: int = 2
    seed: int = 0
    alpha_dtype: torch.dtype = torch.float32  # the dtype alpha will be stored in
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        check_rank_settings(self.new_rank, self.new_conv_rank, self.dynamic_method, self.dynamic_param)
        if self.remove_conv and self.remove_linear:
            raise LoraToolsError("--remove_conv_dims and --remove_linear_dims together would remove every module")


@dataclass
class ResizeJob:
    """One module: its name (as in the file), the weight shape it targets, and its adapter."""

    name: str
    shape: tuple[int, ...]
    adapter: Adapter
    base_weight: torch.Tensor | None = None  # only for DoRA


@dataclass
class ResizeResult:
    name: str
    tensors: dict[str, torch.Tensor]  # kohya suffixes: lora_down.weight, lora_up.weight, alpha (+ diff_b)
    report: dict


def is_removed(job: ResizeJob, settings: ResizeSettings) -> bool:
    conv = is_conv_kernel(job.shape)
    return (settings.remove_conv and conv) or (settings.remove_linear and not conv)


def uses_factored_route(job: ResizeJob) -> bool:
    return job.adapter.kind == "lora" and job.adapter.dora is None


def resize_layers(jobs: Sequence[ResizeJob], settings: ResizeSettings,
                  on_done: Callable[[ResizeResult], None] | None = None) -> dict[str, ResizeResult]:
    """Resize every job that is not removed; results by job name, `on_done` called per finished layer."""
    kept = [j for j in jobs if not is_removed(j, settings)]
    for job in kept:
        if job.adapter.dora is not None and job.base_weight is None:
            raise LoraToolsError("DoRA module: its effect depends on the base weight; pass --base_model to convert "
                                 "it to a plain LoRA", key=job.name)
    results: dict[str, ResizeResult] = {}

    def done(result: ResizeResult) -> None:
        results[result.name] = result
        if on_done:
            on_done(result)

    for batch in _batches([j for j in kept if uses_factored_route(j)]):
        for result in _resize_factored_batch(batch, settings):
            done(result)
    for job in kept:
        if not uses_factored_route(job):
            done(_resize_dense(job, settings))
    return results


# ---------------------------------------------------------------------------------------------------------
# Factored route (LoRA / LoCon / Tucker)


def _batches(jobs: Iterable[ResizeJob]) -> Iterator[list[ResizeJob]]:
    """Jobs grouped by (out, in·k·k, r) so one batched QR/SVD call serves them all, size-capped."""
    groups: dict[tuple[int, int, int], list[ResizeJob]] = defaultdict(list)
    for job in jobs:
        groups[(job.shape[0], math.prod(job.shape[1:]), int(job.adapter.rank))].append(job)
    for (out_dim, in_dim, rank), members in groups.items():
        size = max(1, MAX_BATCH_ELEMENTS // max((out_dim + in_dim) * rank, 1))
        for start in range(0, len(members), size):
            yield members[start:start + size]


def _resize_factored_batch(batch: list[ResizeJob], settings: ResizeSettings) -> list[ResizeResult]:
    pairs = [job.adapter.factors() for job in batch]  # scale folded into up: up@down = ΔW (flattened)
    ups = torch.stack([u for u, _ in pairs]).to(settings.device)
    downs = torch.stack([d for _, d in pairs]).to(settings.device)
    svd = factored_svd(ups, downs)
    S_all, U_all, Vh_all = svd.S.cpu(), svd.U.cpu(), svd.Vh.cpu()
    results = []
    for i, job in enumerate(batch):
        S = S_all[i]
        # The factored SVD gives the whole spectrum, so Σσ² is the exact ‖ΔW‖² (no truncated-spectrum bias).
        total = float(S.double().square().sum())
        k = select_rank(S, settings.dynamic_method, settings.dynamic_param, max_rank=rank_cap(job.shape, settings),
                        total_energy=total, input_rank=job.adapter.rank)
        # The whole spectrum is known: the tail is the exact error (total − kept would cancel near full rank).
        error_sq = float(S[k:].double().square().sum())
        results.append(_result(job, U_all[i, :, :k], S[:k], Vh_all[i, :k], S, total, k, error_sq, settings,
                               "factored"))
    return results


# ---------------------------------------------------------------------------------------------------------
# Dense route (LoHa / LoKr / full diff / DoRA with its base weight)


def dense_delta(job: ResizeJob, device: torch.device) -> torch.Tensor:
    """The module's full change to its weight as an out × in·k·k float32 matrix."""
    if job.adapter.dora is not None:
        delta = job.adapter.delta_with_base(job.base_weight.to(device))
    else:
        delta = job.adapter.delta(tuple(job.shape))
    return delta.to(device, torch.float32).reshape(job.shape[0], -1)


def dense_input_rank(adapter: Adapter) -> int | None:
    """An upper bound on the rank of a non-LoRA delta: LoHa's Hadamard product of two rank-r terms has rank ≤ r²."""
    if adapter.kind == "loha" and getattr(adapter, "t1", None) is None:
        return int(adapter.rank) ** 2
    return None


def _resize_dense(job: ResizeJob, settings: ResizeSettings) -> ResizeResult:
    matrix = dense_delta(job, settings.device)
    total = float(dense_sq_norm(matrix))
    cap = min(rank_cap(job.shape, settings), *matrix.shape)
    bound = dense_input_rank(job.adapter)
    if bound is not None:
        cap = min(cap, bound)
    if settings.dynamic_method == "sv_cumulative":
        # Σσ (the nuclear norm) has no cheap exact form: take the exact thin SVD for this rule.
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        route = "dense-exact"
    else:
        generator = seeded_generator(stable_seed(settings.seed, job.name), matrix.device)
        U, S, Vh = randomized_svd(matrix, cap, oversample=settings.oversample, n_iter=settings.power_iters,
                                  generator=generator)
        route = "randomized"
    k = select_rank(S, settings.dynamic_method, settings.dynamic_param, max_rank=cap, total_energy=total,
                    input_rank=bound)
    # Measured residual of the rank-k result (one GEMM, cheap next to the SVD): exact even at full rank.
    matrix -= (U[:, :k] * S[:k]) @ Vh[:k]
    error_sq = float(dense_sq_norm(matrix))
    S, U, Vh = S.cpu(), U.cpu(), Vh.cpu()
    return _result(job, U[:, :k], S[:k], Vh[:k], S, total, k, error_sq, settings, route)


# ---------------------------------------------------------------------------------------------------------


def _result(job: ResizeJob, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, spectrum: torch.Tensor, total: float,
            k: int, error_sq: float, settings: ResizeSettings, route: str) -> ResizeResult:
    adapter = job.adapter
    # Keep the effective scale: a plain LoRA keeps alpha/rank; converted types get scale 1 (alpha = k).
    scale = adapter.scale if adapter.kind == "lora" and adapter.dora is None else 1.0
    up, down, alpha = svd_to_lora(U, S, Vh, job.shape, scale=scale, alpha_dtype=settings.alpha_dtype)
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}
    if adapter.bias_delta is not None:
        tensors["diff_b"] = adapter.bias_delta
    figures = retained(spectrum, k, total_energy=total, error_sq=error_sq)
    report = {"module": job.name, "type": adapter.describe(), "route": route, "shape": list(job.shape),
              "old_rank": adapter.rank, "new_rank": k, "alpha": alpha, **figures}
    return ResizeResult(job.name, tensors, report)


def summarize(reports: Sequence[dict]) -> dict:
    """Mean/min retained Frobenius share and worst relative error over the resized layers."""
    if not reports:
        return {"layers": 0}
    fro = [r["fro_retained"] for r in reports]
    return {"layers": len(reports), "mean_fro_retained": sum(fro) / len(fro), "min_fro_retained": min(fro),
            "max_rel_error": max(r["rel_error"] for r in reports),
            "ranks": sorted({r["new_rank"] for r in reports})}
