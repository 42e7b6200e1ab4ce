"""Resize the adapters of a LoRA file to a new (fixed or per-layer dynamic) rank. Pure maths, no file I/O.

Each module becomes one job of the low-rank engine (library/lowrank_engine.py):
- LoRA / LoCon / Tucker: the exact factored SVD of (α/r)·up@down (QR of up and downᵀ, SVD of the r×r core),
  batched over layers of equal (out, in·k·k, r). The dense delta is never formed, every singular value is
  exact, so the dynamic rules and the retained-energy figures are exact too.
- LoHa / LoKr: through their exact low-rank factors (rank r₁·r₂, networks' `exact_factors`) on the same
  factored route, while that is cheaper than the dense one (library.exact_lowrank decides, by measured cost).
- Full diff, and LoHa / LoKr of too large an exact rank: their delta is formed per layer and factored by a
  seeded randomized SVD; the figures are measured against the exact norm of that delta (sv_cumulative needs
  Σσ, so it uses the exact thin SVD for these layers). The output is a plain LoRA.
- DoRA: the change it makes depends on the base weight; with `base_weight` given, the module's full effect
  W_dora − W is factored like a dense delta (plain LoRA out), otherwise the module is refused.

The effective scale is kept: new alpha = (old alpha / old rank)·new rank (sd-scripts' rule), rounded to the
save dtype, and the factors use the stored alpha, so (alpha/k)·up@down is the optimal rank-k truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.exact_lowrank import exact_rank, lowrank_parts
from library.lowrank import check_rank_settings, is_conv_kernel
from library.lowrank_engine import EngineSettings, LayerResult, LowRankJob, run_jobs, summarize
from networks.base import Adapter

__all__ = ["ResizeJob", "ResizeSettings", "is_removed", "resize_layers", "summarize"]


@dataclass
class ResizeSettings:
    new_rank: int = 4
    new_conv_rank: int | None = None  # every conv, 1×1 included (sd-scripts' resize); None = new_rank
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    remove_conv: bool = False  # drop k×k conv modules from the output
    remove_linear: bool = False  # drop Linear and 1×1 conv modules from the output
    oversample: int | None = None  # randomized SVD (dense inputs); None = lowrank's default
    power_iters: int = 2
    seed: int = 0
    alpha_dtype: torch.dtype = torch.float32  # the dtype alpha will be stored in
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        check_rank_settings(self.new_rank, self.new_conv_rank, self.dynamic_method, self.dynamic_param)
        if self.remove_conv and self.remove_linear:
            raise LoraToolsError("--remove_conv_dims and --remove_linear_dims together would remove every module")

    def engine(self) -> EngineSettings:
        return EngineSettings(oversample=self.oversample, power_iters=self.power_iters, seed=self.seed,
                              alpha_dtype=self.alpha_dtype, device=self.device)


@dataclass
class ResizeJob:
    """One module: its name (as in the file), the weight shape it targets, and its adapter."""

    name: str
    shape: tuple[int, ...]
    adapter: Adapter
    base_weight: torch.Tensor | None = None  # only for DoRA


def is_removed(job: ResizeJob, settings: ResizeSettings) -> bool:
    conv = is_conv_kernel(job.shape)
    return (settings.remove_conv and conv) or (settings.remove_linear and not conv)


def resize_rank_cap(shape: Sequence[int], settings: ResizeSettings) -> int:
    """The rank (or cap) of one layer: `new_conv_rank` for every conv module, 1×1 ones included, as sd-scripts'
    resize_lora.py gives it to every 4-D module (svd_merge and extract give it to k×k convs only, as theirs)."""
    if len(shape) == 4 and settings.new_conv_rank is not None:
        return settings.new_conv_rank
    return settings.new_rank


def factored_part(job: ResizeJob, settings: ResizeSettings) -> object | None:
    """The engine part of a LoRA/LoCon/Tucker module, or a LoHa/LoKr's exact factors when that is the cheaper
    route (library.exact_lowrank decides); None for the dense route."""
    parts = lowrank_parts([job.adapter], tuple(job.shape), resize_rank_cap(job.shape, settings))
    return None if parts is None else parts[0]


def uses_factored_route(job: ResizeJob, settings: ResizeSettings) -> bool:
    return factored_part(job, settings) is not None


def resize_layers(jobs: Sequence[ResizeJob], settings: ResizeSettings,
                  on_done: Callable[[LayerResult], None] | None = None) -> dict[str, LayerResult]:
    """Resize every job that is not removed; results by job name, `on_done` called per finished layer.

    A result's `tensors` are the module's (down, up, alpha, and the input's `diff_b`); its `report` is the
    engine's schema plus "type" (the input adapter)."""
    kept = [j for j in jobs if not is_removed(j, settings)]
    for job in kept:
        if job.adapter.dora is not None and job.base_weight is None:
            raise LoraToolsError("DoRA module: its effect depends on the base weight; pass --base_model to convert "
                                 "it to a plain LoRA", key=job.name)
    by_name = {job.name: job for job in kept}

    def done(layer: LayerResult) -> None:
        job = by_name[layer.name]
        layer.bias = job.adapter.bias_delta
        layer.info["type"] = job.adapter.describe()
        if on_done:
            on_done(layer)

    return run_jobs([engine_job(job, settings) for job in kept], settings.engine(), done)


def engine_job(job: ResizeJob, settings: ResizeSettings) -> LowRankJob:
    adapter = job.adapter
    common = dict(name=job.name, shape=tuple(job.shape), max_rank=resize_rank_cap(job.shape, settings),
                  method=settings.dynamic_method, param=settings.dynamic_param, rank_in=adapter.rank)
    part = factored_part(job, settings)
    if part is not None and adapter.kind == "lora":
        # factors() folds the scale into up (up@down = ΔW); the output keeps alpha/rank (sd-scripts' rule).
        return LowRankJob(parts=[(adapter, 1.0)], input_rank=adapter.rank, scale=output_scale(adapter.scale),
                          **common)
    # Converted types (LoHa/LoKr, full diff, DoRA) get scale 1 (alpha = k). LoHa/LoKr go factored through their
    # exact factors (rank r₁·r₂, also the cap of the new rank) when that pays; else their delta is formed
    # only when the engine reaches the job.
    if part is not None:
        return LowRankJob(parts=[(part, 1.0)], input_rank=part.rank, **common)
    return LowRankJob(dense=lambda: dense_delta(job, settings.device), input_rank=dense_input_rank(adapter), **common)


def output_scale(scale: float) -> float:
    """The output's alpha/rank: the input's, made positive (sd-scripts' rule keeps it; a stored alpha is > 0).

    A negative alpha only flips the sign of ΔW, which the SVD carries in its vectors: |α|/r gives the same
    delta exactly. (An alpha of 0 never gets here: networks/ reads it as alpha = rank, as kohya does.)
    """
    return abs(float(scale))


def dense_delta(job: ResizeJob, device: torch.device) -> torch.Tensor:
    """The module's full change to its weight as an out × in·k·k float32 matrix."""
    if job.adapter.dora is not None:
        delta = job.adapter.delta_with_base(job.base_weight.to(device))
    else:
        delta = job.adapter.delta(tuple(job.shape))
    return delta.to(device, torch.float32).reshape(job.shape[0], -1)


def dense_input_rank(adapter: Adapter) -> int | None:
    """An upper bound on the rank of a non-LoRA delta: that of its exact low-rank form (LoHa/LoKr: r₁·r₂)."""
    if adapter.dora is not None or adapter.kind == "lora":
        return None
    return exact_rank(adapter)
