"""The rank rules by name, and the range of each rule's parameter: torch-free, so that `--help` choice
lists and flag checks need no torch (the rules themselves are computed in library.lowrank.select_rank).

    sv_ratio       keep σᵢ > σ₀/p               p ≥ 1 (p < 1 would keep nothing above σ₀: always rank 1)
    sv_fro         keep a p share of ‖ΔW‖_F      0 < p ≤ 1
    sv_cumulative  keep a p share of Σσ          0 < p ≤ 1
"""

from __future__ import annotations

import math

from library.errors import LoraToolsError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")

# method -> (lowest, lowest included, highest) of its --dynamic_param as documented above
PARAM_RANGES = {"sv_ratio": (1.0, True, math.inf), "sv_fro": (0.0, False, 1.0), "sv_cumulative": (0.0, False, 1.0)}


def param_range_text(method: str) -> str:
    low, included, high = PARAM_RANGES[method]
    if high == math.inf:
        return f"≥ {low:g}"
    return f"in {'[' if included else '('}{low:g}, {high:g}]"


def check_dynamic_flags(method: str | None, param: float | None) -> None:
    """The user-facing check of --dynamic_method / --dynamic_param: a parameter outside its method's range
    would silently give rank 1 (or the cap) everywhere, so it is refused in one line before any work."""
    if method is None:
        return
    if param is None:
        raise LoraToolsError(f"--dynamic_method {method} needs --dynamic_param ({param_range_text(method)})")
    low, included, high = PARAM_RANGES[method]
    inside = (param >= low if included else param > low) and param <= high
    if not inside:
        raise LoraToolsError(f"--dynamic_param: value {param:g} is outside the range of {method}: "
                             f"use a value {param_range_text(method)}")


def check_quantile(value: float | None, flag: str = "--clamp_quantile") -> None:
    """A clamp quantile is a fraction of the factors' entries: in (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise LoraToolsError(f"{flag}: value {value:g} must be in (0, 1]: the quantile of the factors' entries")
