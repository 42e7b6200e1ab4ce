"""SVD merge: several adapters on one target layer → one low-rank LoRA. Pure maths, no file I/O.

Each target layer is a `LayerJob`: its weight shape and the adapters on it with their weights
(ratio × block weight). Two routes:

- factored: mode `add` with only plain LoRA/LoCon/Tucker inputs. Σ wᵢ·upᵢ@downᵢ is stacked and its exact
  thin SVD taken from QRs of the stacked factors and an SVD of the small R×R core (lowrank.factored_svd),
  batched over layers of equal (out, in, R). The out×in delta is never formed, the truncation is the
  Eckart–Young optimum, and the error of the result is exact (from the spectrum, or from the Gram matrices
  when a clamp changed the factors).
- dense: the element-wise modes (ties, dare_*, magnitude_prune are defined on the dense deltas) and any
  LoHa/LoKr/full-diff input (their deltas are not low-rank products). One layer at a time: the merged
  delta M is formed, a seeded randomized SVD (oversampling + power iterations) gives the factors, and the
  error is measured directly against M.
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
    clamp_quantile,
    dense_sq_norm,
    factored_svd,
    lowrank_fro_norm_sq,
    randomized_svd,
    rank_cap,
    seeded_generator,
    select_rank,
    svd_to_lora,
)
from library.merge_methods import SIGN_METHODS, MergeContext, get_method, merge_tensors, stable_seed
from networks.base import Adapter

# Stacked factors of one batch stay under this many elements per side (64 MiB in fp32), so batching
# the 38 Flux `linear1` layers at rank 128 does not need gigabytes at once.
MAX_BATCH_ELEMENTS = 1 << 24


@dataclass
class MergeSettings:
    mode: str = "add"
    new_rank: int = 4
    new_conv_rank: int | None = None  # k×k convs; None = new_rank (sd-scripts)
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    density: float = 1.0
    sign_method: str = "total"
    seed: int = 0
    clamp_quantile: float | None = None
    oversample: int | None = None  # randomized SVD; None = max(rank, 10)
    power_iters: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.mode = get_method(self.mode).name
        check_rank_settings(self.new_rank, self.new_conv_rank, self.dynamic_method, self.dynamic_param)
        if not 0.0 < self.density <= 1.0:
            raise LoraToolsError(f"--density must be in (0, 1], got {self.density}")
        if self.sign_method not in SIGN_METHODS:
            raise LoraToolsError(f"--majority_sign_method must be one of {', '.join(SIGN_METHODS)}")
        if self.dtype not in (torch.float32, torch.float64):
            # QR/SVD have no half-precision kernels on CPU (and poor ones on CUDA): the maths stays fp32.
            self.dtype = torch.float32


@dataclass
class LayerJob:
    """One target weight: `name` (for seeds and reports), `shape` (out, in[, kh, kw]) and its inputs.

    `parts` are (slot, adapter, weight): slot = index of the input file among `n_inputs`, so that an
    element-wise merge sees the same list position for a file whatever other files lack this layer
    (DARE's masks are seeded per position; a missing file is a zero delta, a no-op in every mode).
    """

    name: str
    shape: tuple[int, ...]
    parts: list[tuple[int, Adapter, float]]
    n_inputs: int = 0

    def __post_init__(self):
        self.n_inputs = max(self.n_inputs, max((slot + 1 for slot, _, _ in self.parts), default=0))


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    up: torch.Tensor  # [out, k] or [out, k, 1, 1], on the CPU
    down: torch.Tensor  # [k, in] or [k, in, kh, kw]
    alpha: float
    bias: torch.Tensor | None
    report: dict


def uses_factored_route(job: LayerJob, settings: MergeSettings) -> bool:
    return settings.mode == "add" and all(a.kind == "lora" and a.dora is None for _, a, _ in job.parts)


def check_job(job: LayerJob) -> None:
    for _, adapter, _ in job.parts:
        if adapter.dora is not None:
            raise LoraToolsError("DoRA module: its delta depends on the base weight, which an SVD merge of LoRAs "
                                 "does not read; convert it first (resize_lora.py --base_model) or bake it into the "
                                 "checkpoint (merge_lora.py --sd_model)", key=job.name)


def merge_layers(jobs: Sequence[LayerJob], settings: MergeSettings,
                 on_done: Callable[[LayerResult], None] | None = None) -> dict[str, LayerResult]:
    """Merge every job; returns results by job name. `on_done` is called once per finished layer (progress)."""
    for job in jobs:
        check_job(job)
    results: dict[str, LayerResult] = {}
    factored = [j for j in jobs if uses_factored_route(j, settings)]
    dense = [j for j in jobs if not uses_factored_route(j, settings)]
    for batch in _batches(factored):
        for result in _merge_factored_batch(batch, settings):
            results[result.name] = result
            if on_done:
                on_done(result)
    for job in dense:
        result = _merge_dense(job, settings)
        results[result.name] = result
        if on_done:
            on_done(result)
    return results


# ---------------------------------------------------------------------------------------------------------
# Factored route


def _fill_batch(batch: list[LayerJob], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked factors of a batch, [B, out, R] and [B, R, in], written in place.

    Per layer this is lowrank.stack_factors (w·up side by side, downs on top of each other, scales folded
    into the ups by Adapter.factors()); filling one preallocated tensor avoids a concatenation per layer
    and a stack per batch, which for a thousand small layers cost more than the QRs themselves.
    """
    out_dim, in_dim = batch[0].shape[0], math.prod(batch[0].shape[1:])
    rank = sum(int(a.rank) for _, a, _ in batch[0].parts)
    big_up = torch.empty(len(batch), out_dim, rank, dtype=dtype)
    big_down = torch.empty(len(batch), rank, in_dim, dtype=dtype)
    for i, job in enumerate(batch):
        start = 0
        for _, adapter, weight in job.parts:
            up, down = adapter.factors()
            stop = start + up.shape[1]
            torch.mul(up, weight, out=big_up[i, :, start:stop])
            big_down[i, start:stop].copy_(down)
            start = stop
    return big_up, big_down


def _batches(jobs: Iterable[LayerJob]) -> Iterator[list[LayerJob]]:
    """Jobs grouped by (out, in·k·k, R) so that one batched QR/SVD call serves them all, size-capped."""
    groups: dict[tuple[int, int, int], list[LayerJob]] = defaultdict(list)
    for job in jobs:
        out_dim, in_dim = job.shape[0], math.prod(job.shape[1:])
        rank = sum(int(a.rank) for _, a, _ in job.parts)
        groups[(out_dim, in_dim, rank)].append(job)
    for (out_dim, in_dim, rank), members in groups.items():
        per_layer = max(out_dim, in_dim) * rank
        size = max(1, MAX_BATCH_ELEMENTS // max(per_layer, 1))
        for start in range(0, len(members), size):
            yield members[start:start + size]


def _merge_factored_batch(batch: list[LayerJob], settings: MergeSettings) -> list[LayerResult]:
    big_up, big_down = _fill_batch(batch, settings.dtype)
    big_up, big_down = big_up.to(settings.device), big_down.to(settings.device)
    svd = factored_svd(big_up, big_down, dtype=settings.dtype)
    # The factored SVD returns the whole spectrum (min(R, out, in) values): Σσ² is the exact ‖M‖_F².
    totals = svd.S.double().square().sum(dim=-1)
    results = []
    for i, job in enumerate(batch):
        S = svd.S[i]
        total = float(totals[i])
        k = select_rank(S, settings.dynamic_method, settings.dynamic_param, max_rank=rank_cap(job.shape, settings),
                        total_energy=total)
        up, down, alpha = svd_to_lora(svd.U[i, :, :k], S[:k], svd.Vh[i, :k], job.shape)
        # S is the whole spectrum here, so the tail is the exact error (total − kept would cancel badly at full rank).
        error_sq = float(S[k:].double().square().sum())
        if settings.clamp_quantile is not None:
            up, down = clamp_quantile(up, down, settings.clamp_quantile)
            # ‖M − (α/k)·up@down‖² exactly, as the norm of the stacked difference [B | up]·[A; down].
            error_sq = float(lowrank_fro_norm_sq([big_up[i], up.reshape(up.shape[0], k)],
                                                 [big_down[i], down.reshape(k, -1)], [1.0, -alpha / k]))
        results.append(_result(job, up, down, alpha, _merged_bias(job, settings), S, k, total, error_sq,
                               route="factored"))
    return results


# ---------------------------------------------------------------------------------------------------------
# Dense route


def merged_delta(job: LayerJob, settings: MergeSettings) -> torch.Tensor:
    """The exact merged delta of one layer, [out, in·k·k], by the chosen element-wise method."""
    out_dim, in_dim = job.shape[0], math.prod(job.shape[1:])
    deltas = [torch.zeros(out_dim, in_dim, device=settings.device, dtype=settings.dtype)] * job.n_inputs
    weights = [1.0] * job.n_inputs
    seen: set[int] = set()
    for slot, adapter, weight in job.parts:
        delta = adapter.delta(job.shape).reshape(out_dim, in_dim).to(settings.device, settings.dtype)
        if slot in seen:
            # Several modules of one file on this weight (e.g. q, k, v slices of a fused qkv): one task tensor.
            deltas[slot] = deltas[slot] + delta * (weight / weights[slot])
        else:
            deltas[slot], weights[slot] = delta, weight
            seen.add(slot)
    ctx = MergeContext(density=settings.density, sign_method=settings.sign_method, seed=settings.seed, name=job.name)
    return merge_tensors(settings.mode, deltas, weights, ctx)


def _merge_dense(job: LayerJob, settings: MergeSettings) -> LayerResult:
    merged = merged_delta(job, settings)
    total = float(dense_sq_norm(merged))
    cap = min(rank_cap(job.shape, settings), *merged.shape)
    if settings.dynamic_method == "sv_cumulative":
        # Σσ over the whole spectrum cannot be had from a sketch: this rule needs the exact SVD.
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        method = "exact"
    else:
        seed = stable_seed(settings.seed, job.name + "#rsvd")
        U, S, Vh = randomized_svd(merged, cap, oversample=settings.oversample, n_iter=settings.power_iters,
                                  generator=seeded_generator(seed, merged.device))
        method = "randomized"
    k = select_rank(S, settings.dynamic_method, settings.dynamic_param, max_rank=cap, total_energy=total)
    up, down, alpha = svd_to_lora(U[:, :k], S[:k], Vh[:k], job.shape)
    if settings.clamp_quantile is not None:
        up, down = clamp_quantile(up, down, settings.clamp_quantile)
    # Measured, not estimated: the sketch's error is what the user needs to see.
    approx = (alpha / k) * up.reshape(up.shape[0], k) @ down.reshape(k, -1)
    error_sq = float(dense_sq_norm(merged - approx))
    return _result(job, up, down, alpha, _merged_bias(job, settings), S, k, total, error_sq, route=f"dense/{method}")


# ---------------------------------------------------------------------------------------------------------
# Shared


def _merged_bias(job: LayerJob, settings: MergeSettings) -> torch.Tensor | None:
    """Bias deltas (LyCORIS `diff_b`, `lora_up.bias`) merged by the same method; absent ones count as zero."""
    if all(a.bias_delta is None for _, a, _ in job.parts):
        return None
    out_dim = job.shape[0]
    biases = [torch.zeros(out_dim)] * job.n_inputs
    weights = [1.0] * job.n_inputs
    seen: set[int] = set()
    for slot, adapter, weight in job.parts:
        bias = adapter.bias_delta.float().reshape(out_dim) if adapter.bias_delta is not None else torch.zeros(out_dim)
        if slot in seen:
            biases[slot] = biases[slot] + bias * (weight / weights[slot])
        else:
            biases[slot], weights[slot] = bias, weight
            seen.add(slot)
    ctx = MergeContext(density=settings.density, sign_method=settings.sign_method, seed=settings.seed,
                       name=job.name + "#bias")
    return merge_tensors(settings.mode, biases, weights, ctx)


def _result(job: LayerJob, up, down, alpha, bias, S: torch.Tensor, k: int, total: float, error_sq: float,
            route: str) -> LayerResult:
    kept = float(S[:k].double().square().sum())
    report = {
        "target": job.name,
        "shape": list(job.shape),
        "route": route,
        "inputs": {slot: a.describe() for slot, a, _ in job.parts},
        "weights": {slot: w for slot, _, w in job.parts},
        "rank_in": sum(int(a.rank or 0) for _, a, _ in job.parts),
        "rank_out": k,
        "energy_retained": min(1.0, kept / total) if total > 0 else 1.0,
        "rel_error": math.sqrt(error_sq / total) if total > 0 else 0.0,
        "sigma_max": float(S[0]) if S.numel() else 0.0,
        "sigma_last_kept": float(S[k - 1]) if S.numel() >= k else 0.0,
    }
    return LayerResult(job.name, tuple(job.shape), up.cpu(), down.cpu(), alpha,
                       bias.cpu() if bias is not None else None, report)
