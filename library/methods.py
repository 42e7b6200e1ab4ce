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

from dataclasses import dataclass

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
)
BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
_ALL_NAMES: dict[str, Method] = {label: m for m in METHODS for label in (m.name, *m.delta_aliases, *m.aliases)}


# Flags of method parameters beyond --density / --majority_sign_method / --seed, by MergeContext field
# (library.cli.add_method_param_args declares them; `method_params` reads them back).
PARAM_FLAGS = {"epsilon": "--epsilon", "lambda_": "--lambda", "gamma": "--gamma"}


def method_params(args) -> dict:
    """The method-parameter flags a script declared, as MergeContext fields ({} when it declared none)."""
    return {field: getattr(args, field) for field in PARAM_FLAGS if getattr(args, field, None) is not None}


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
    """For a `--mode` value of flux_merge_lora.py (which offers both spaces): delta for the `*_svd` names."""
    return DELTA if name in delta_aliases() else FACTOR


def is_random(name: str) -> bool:
    return method(name).random


def recorded_seed(seed: int, *, mode: str | None = None, shuffle: bool = False, block_weights=(),
                  randomized_svd: bool = False) -> int | None:
    """The seed to record in provenance: only when something in the run drew from it (a random method,
    --shuffle, R/U block weights, a randomized SVD), so that the metadata says when a result is seeded."""
    used = (mode is not None and is_random(mode)) or shuffle or randomized_svd
    used = used or any(getattr(bw, "random", False) for bw in block_weights if bw is not None)
    return seed if used else None
