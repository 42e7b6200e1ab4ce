"""SVD merge: several adapters on one target layer → one low-rank LoRA. Pure maths, no file I/O.

Each target layer is a `LayerJob`: its weight shape and the adapters on it with their weights
(ratio × block weight). Three routes:

- factored: mode `add` with plain LoRA/LoCon/Tucker inputs, and LoHa/LoKr ones through their exact
  low-rank factors (rank r₁·r₂) while that is cheaper than the dense route (library.exact_lowrank).
  Σ wᵢ·upᵢ@downᵢ is stacked and its exact thin SVD taken from QRs of the stacked factors and an SVD of
  the small R×R core (lowrank.factored_svd), batched over layers of equal (out, in, R). The out×in delta
  is never formed, the truncation is the Eckart–Young optimum, and the error of the result is exact (from
  the spectrum, or from the Gram matrices when a clamp changed the factors).
- singular (tsv, iso_c, iso_cts, knots, np_lora): library.singular_layers hands the engine each layer's
  exact thin SVD of the method's merged delta, computed on the Σr×Σr core of the stacked factors
  (library.singular_methods); every input type is taken as exact factors, so M is never formed either.
- dense: the element-wise modes (ties, dare_*, magnitude_prune, della, breadcrumbs are defined on the dense
  deltas), full-diff inputs, and LoHa/LoKr whose exact rank is too large for the factored route to pay. One
  layer at a time: the merged delta M is formed, a seeded randomized SVD (oversampling + power iterations)
  gives the factors, and the
  error is measured directly against M.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.exact_lowrank import lowrank_parts
from library.lowrank import check_rank_settings, rank_cap
from library.lowrank_engine import EngineSettings, LayerResult, LowRankJob, run_jobs
from library.merge_methods import SIGN_METHODS, MergeContext, check_context, get_method, merge_tensors
from library.methods import FLAT_SPECTRUM_METHODS, SINGULAR_METHODS, SingularParams
from networks.base import Adapter

__all__ = ["LayerJob", "LayerResult", "MergeSettings", "merge_layers", "merged_delta", "uses_factored_route"]


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
    oversample: int | None = None  # randomized SVD; None = lowrank's default
    power_iters: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    epsilon: float = 0.1  # della (library/merge_methods_sparse.py)
    lambda_: float = 1.0  # della
    gamma: float = 0.01  # breadcrumbs
    singular: SingularParams = field(default_factory=SingularParams)  # tsv / iso_* / knots / np_lora

    def __post_init__(self):
        self.mode = get_method(self.mode).name
        check_rank_settings(self.new_rank, self.new_conv_rank, self.dynamic_method, self.dynamic_param)
        if not 0.0 < self.density <= 1.0:
            raise LoraToolsError(f"--density must be in (0, 1], got {self.density}")
        if self.sign_method not in SIGN_METHODS:
            raise LoraToolsError(f"--majority_sign_method must be one of {', '.join(SIGN_METHODS)}")
        check_context(get_method(self.mode), self.context(""))  # della/breadcrumbs: refused before any work
        if self.mode in FLAT_SPECTRUM_METHODS and self.dynamic_method is not None:
            raise LoraToolsError(f"--mode {self.mode} gives every direction the same singular value, so "
                                 f"--dynamic_method has nothing to rank: use a fixed --new_rank")
        if self.dtype not in (torch.float32, torch.float64):
            # QR/SVD have no half-precision kernels on CPU (and poor ones on CUDA): the maths stays fp32.
            self.dtype = torch.float32

    def context(self, name: str) -> MergeContext:
        return MergeContext(density=self.density, sign_method=self.sign_method, seed=self.seed, name=name,
                            epsilon=self.epsilon, lambda_=self.lambda_, gamma=self.gamma)

    def engine(self) -> EngineSettings:
        return EngineSettings(oversample=self.oversample, power_iters=self.power_iters, seed=self.seed,
                              clamp_quantile=self.clamp_quantile, device=self.device, dtype=self.dtype)


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


def uses_factored_route(job: LayerJob, settings: MergeSettings) -> bool:
    if settings.mode in SINGULAR_METHODS:
        return True  # library.singular_layers: every input as exact factors, the method on the Σr×Σr core
    return _factored_parts(job, settings) is not None


def _factored_parts(job: LayerJob, settings: MergeSettings) -> list | None:
    """The engine parts of `add` over LoRA inputs, and over LoHa/LoKr ones through their exact factors when
    that is the cheaper route (library.exact_lowrank decides); None for the dense route."""
    if settings.mode != "add":
        return None
    return lowrank_parts([a for _, a, _ in job.parts], tuple(job.shape), rank_cap(job.shape, settings))


def check_job(job: LayerJob) -> None:
    for _, adapter, _ in job.parts:
        if adapter.dora is not None:
            raise LoraToolsError("DoRA module: its delta depends on the base weight, which an SVD merge of LoRAs "
                                 "does not read; convert it first (resize_lora.py --base_model) or bake it into the "
                                 "checkpoint (merge_lora.py --sd_model)", key=job.name)


def merge_layers(jobs: Sequence[LayerJob], settings: MergeSettings,
                 on_done: Callable[[LayerResult], None] | None = None) -> dict[str, LayerResult]:
    """Merge every job; returns results by job name. `on_done` is called once per finished layer (progress).

    A result's `report` is the engine's schema plus "inputs" and "weights" by input slot; `bias` is the
    merged bias delta (or None)."""
    for job in jobs:
        check_job(job)
        if settings.mode == "np_lora" and job.n_inputs != 2:
            raise LoraToolsError(f"--mode np_lora merges exactly two LoRAs (--models SUBJECT STYLE), got {job.n_inputs}")
    by_name = {job.name: job for job in jobs}

    def done(layer: LayerResult) -> None:
        job = by_name[layer.name]
        layer.bias = _merged_bias(job, settings)
        layer.info.update(inputs={slot: a.describe() for slot, a, _ in job.parts},
                          weights={slot: w for slot, _, w in job.parts})
        if on_done:
            on_done(layer)

    return run_jobs([engine_job(job, settings) for job in jobs], settings.engine(), done)


def engine_job(job: LayerJob, settings: MergeSettings) -> LowRankJob:
    common = dict(name=job.name, shape=tuple(job.shape), max_rank=rank_cap(job.shape, settings),
                  method=settings.dynamic_method, param=settings.dynamic_param,
                  rank_in=sum(int(a.rank or 0) for _, a, _ in job.parts))
    if settings.mode in SINGULAR_METHODS:
        from library.singular_layers import SingularLayer

        return LowRankJob(svd=SingularLayer(job, settings).svd, **common)
    parts = _factored_parts(job, settings)
    if parts is not None:
        return LowRankJob(parts=[(part, weight) for part, (_, _, weight) in zip(parts, job.parts)], **common)
    # Each sketch has its own seed name so that it never shares a stream with the DARE masks of the layer.
    return LowRankJob(dense=lambda: merged_delta(job, settings), seed_name=job.name + "#rsvd", **common)


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
    return merge_tensors(settings.mode, deltas, weights, settings.context(job.name))


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
    return merge_tensors(settings.mode, biases, weights, settings.context(job.name + "#bias"))
