"""The merge methods by name: the one list every script's `--mode` choices, aliases and seed record come from.

Data only, and no torch at import (so that `--help` stays fast); the tensor functions live in
library.merge_methods and are looked up from here by name when work starts.

Each method says in which space it works:
  factor  applied to the LoRA factors (merge_lora.py / flux_merge_lora.py without a checkpoint):
          `concat` stacks them (exact); the others merge the ups and the downs separately (approximate)
  delta   applied to each layer's full delta before an SVD back to a rank (svd_merge_lora.py, and
          flux_merge_lora.py's `svd` / `*_svd` modes)
  model   applied to whole checkpoints, one key at a time (merge_models.py, library.model_merge): the
          delta methods act on the task vectors Mᵢ − base; weighted_sum, add_difference and slerp only here
and whether it draws random numbers (then the seed is recorded in the output's provenance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from library.errors import LoraToolsError

FACTOR, DELTA, MODEL = "factor", "delta", "model"
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Method:
    name: str
    spaces: tuple[str, ...]
    random: bool  # draws random numbers from --seed: provenance records the seed
    params: tuple[str, ...]  # MergeContext fields the method reads
    summary: str
    delta_aliases: tuple[str, ...] = ()  # names that pick the delta-space version (ComfyUI Power-Merge's *_svd)
    aliases: tuple[str, ...] = ()  # other names of the same method (PEFT / mergekit)


METHODS: tuple[Method, ...] = (
    Method("concat", (FACTOR,), False, (), "ranks stacked: exactly Σ ratioᵢ·ΔWᵢ"),
    Method("add", (FACTOR, DELTA, MODEL), False, (), "weighted sum Σ wᵢ tᵢ", ("svd", "add_svd"),
           ("linear", "task_arithmetic")),
    Method("ties", (FACTOR, DELTA, MODEL), False, ("density", "sign_method"),
           "top-density magnitudes, elected sign, mean of agreeing entries", ("ties_svd",)),
    Method("dare_linear", (FACTOR, DELTA, MODEL), True, ("density", "seed"),
           "random drop (keep = density), rescale by 1/density, weighted sum", ("dare_linear_svd",)),
    Method("dare_ties", (FACTOR, DELTA, MODEL), True, ("density", "sign_method", "seed"),
           "random drop and rescale, elected sign, mean of agreeing entries", ("dare_ties_svd",)),
    Method("magnitude_prune", (FACTOR, DELTA, MODEL), False, ("density",),
           "top-density magnitudes per tensor, weighted sum", ("magnitude_prune_svd",)),
    Method("weighted_sum", (MODEL,), False, (), "Σ rᵢ·Mᵢ (sd-scripts' merge_models)"),
    Method("add_difference", (MODEL,), False, (), "A + r·(B − base): task arithmetic with A's ratio 1"),
    Method("slerp", (MODEL,), False, (), "spherical interpolation of two models, t = r_B / (r_A + r_B)"),
    Method("della", (FACTOR, DELTA), True, ("density", "epsilon", "lambda_", "sign_method", "seed"),
           "magnitude-ranked keep probabilities density±epsilon per row, rescale by 1/p, elected sign, "
           "mean of agreeing entries, × lambda", ("della_svd",)),
    Method("breadcrumbs", (FACTOR, DELTA), False, ("density", "gamma"),
           "drop the top-gamma magnitudes and all below the next density share, weighted sum",
           ("breadcrumbs_svd",), ("model_breadcrumbs",)),
    # Singular-space methods (library.singular_methods): delta space only, computed on the Σr×Σr core.
    Method("tsv", (DELTA,), False, ("singular",),
           "Task Singular Vectors: each task's top singular vectors, orthogonalised across tasks, summed"),
    Method("iso_c", (DELTA,), False, ("singular",), "Iso-C: the sum with its singular values replaced by their mean"),
    Method("iso_cts", (DELTA,), False, ("singular",),
           "Iso-CTS: common subspace of the sum plus each task's own residual directions, flat spectrum"),
    # Random only with --knots_method dare_*; the seed is recorded for every knots run.
    Method("knots", (DELTA,), True, ("singular", "density", "sign_method", "seed"),
           "KnOTS: shared SVD basis of the concatenated deltas, task coordinates merged by --knots_method"),
    Method("np_lora", (DELTA,), False, ("singular",),
           "NP-LoRA: first LoRA (subject) projected off the principal output directions of the second (style), summed"),
)
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
_ALL_NAMES: dict[str, Method] = {label: m for m in METHODS for label in (m.name, *m.delta_aliases, *m.aliases)}


# Flags of method parameters beyond --density / --majority_sign_method / --seed, by MergeContext field
# (library.cli.add_method_param_args declares them; `method_params` reads them back).
PARAM_FLAGS = {"epsilon": "--epsilon", "lambda_": "--lambda", "gamma": "--gamma"}


def method_params(args) -> dict:
    """The method-parameter flags a script declared, as MergeContext fields ({} when it declared none):
    della/breadcrumbs' by name, the singular-space methods' as one SingularParams."""
    params = {field: getattr(args, field) for field in PARAM_FLAGS if getattr(args, field, None) is not None}
    if any(getattr(args, f.name, None) is not None for f in fields(SingularParams)):
        params["singular"] = SingularParams.from_args(args)
    return params


def names(space: str) -> tuple[str, ...]:
    """The methods' own names usable in `space`, in registry order."""
    return tuple(m.name for m in METHODS if space in m.spaces)


def delta_aliases() -> tuple[str, ...]:
    """The names that pick a method's delta-space version (`svd`, `add_svd`, `ties_svd`, …)."""
    return tuple(alias for m in METHODS for alias in m.delta_aliases)


def mode_choices(space: str) -> tuple[str, ...]:
    """`--mode` choices of a script working in `space`: the names, and for delta space the `*_svd` aliases."""
    if space == DELTA:
        return tuple(sorted((*names(DELTA), *delta_aliases())))
    return names(FACTOR)


def method(name: str) -> Method:
    """The method called `name` (its own name or any alias)."""
    try:
        return _ALL_NAMES[name]
    except KeyError:
        raise LoraToolsError(f"unknown merge mode {name!r}; use one of {', '.join(sorted(_ALL_NAMES))}") from None


def space_of(name: str) -> str:
    """For a `--mode` value of flux_merge_lora.py (which offers both spaces): delta for the `*_svd` names
    and for the methods that exist only in delta space (tsv, iso_c, …)."""
    return DELTA if name in delta_aliases() or name in delta_only() else FACTOR


def delta_only() -> tuple[str, ...]:
    """Methods with no factor-space version: flux_merge_lora.py offers them under their own names."""
    return tuple(m.name for m in METHODS if m.spaces == (DELTA,))


def is_random(name: str) -> bool:
    return method(name).random


def recorded_seed(seed: int, *, mode: str | None = None, shuffle: bool = False, block_weights=(),
                  randomized_svd: bool = False) -> int | None:
    """The seed to record in provenance: only when something in the run drew from it (a random method,
    --shuffle, R/U block weights, a randomized SVD), so that the metadata says when a result is seeded."""
    used = (mode is not None and is_random(mode)) or shuffle or randomized_svd
    used = used or any(getattr(bw, "random", False) for bw in block_weights if bw is not None)
    return seed if used else None


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters of the singular-space methods (torch-free: argparse reads them, library.singular_methods uses them)

SINGULAR_METHODS = ("tsv", "iso_c", "iso_cts", "knots", "np_lora")
FLAT_SPECTRUM_METHODS = ("iso_c", "iso_cts")  # every kept singular value equal: rank rules have nothing to rank
KNOTS_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # element-wise merges of KnOTS


@dataclass(frozen=True)
class SingularParams:
    """--merge_alpha, --tsv_fraction, --common_space_fraction, --knots_method, --np_rank, --np_mu."""

    merge_alpha: float = 1.0  # tsv / iso_c / iso_cts / knots: scale of the merged delta (the papers' α / λ)
    tsv_fraction: float = 1.0  # tsv: each of T tasks keeps ⌊fraction·D/T⌋ singular triplets (D = core size)
    common_space_fraction: float = 0.8  # iso_cts: share of D given to the common subspace
    knots_method: str = "ties"  # knots: element-wise merge of the aligned task coordinates
    np_rank: int | None = None  # np_lora: style directions projected out (None = all of the style's rank)
    np_mu: float = math.inf  # np_lora: soft projection strength (0 = plain sum, inf = hard null-space projection)

    def __post_init__(self):
        checks = [(math.isfinite(self.merge_alpha), "--merge_alpha", "a finite number", self.merge_alpha),
                  (0.0 < self.tsv_fraction <= 1.0, "--tsv_fraction", "in (0, 1]", self.tsv_fraction),
                  (0.0 <= self.common_space_fraction <= 1.0, "--common_space_fraction", "in [0, 1]",
                   self.common_space_fraction),
                  (self.knots_method in KNOTS_METHODS, "--knots_method", f"one of {', '.join(KNOTS_METHODS)}",
                   self.knots_method),
                  (self.np_rank is None or self.np_rank >= 1, "--np_rank", "a positive integer", self.np_rank),
                  (self.np_mu >= 0.0, "--np_mu", "0 or more (inf = hard projection)", self.np_mu)]
        for ok, flag, rule, value in checks:
            if not ok:
                raise LoraToolsError(f"{flag} must be {rule}, got {value}")

    @classmethod
    def from_args(cls, args) -> SingularParams:
        """The parameters a script's parsed flags give (defaults for flags the script does not have)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
