"""`--ratios auto`: each input's strength from the inverse of its delta's norm, computed from the factors.

For input i, Nᵢ = (Σ over its modules of ‖ΔW‖_F²)^½ with ΔW the module's delta including its alpha/rank
scale (block weights are not part of it: they apply on top). The automatic ratio is rᵢ = N̄ / Nᵢ with
N̄ = (1/K)·Σⱼ Nⱼ the inputs' mean norm: every input then enters the merge with the same norm N̄, so one
LoRA trained with a large alpha or learning rate no longer drowns the others, and the result keeps the
inputs' typical size.

A low-rank ΔW = B·A is never formed: ‖BA‖_F² = trace((BᵀB)(AAᵀ)) from the two r×r Gram matrices
(library.lowrank.lowrank_fro_norm_sq); LoHa/LoKr use their exact factors (rank r₁·r₂) while that rank is
below min(out, in), a full diff its own norm. A DoRA module counts its low-rank part (its magnitude
vector rescales the base weight, which a LoRA merge does not read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from library.errors import LoraToolsError
from library.exact_lowrank import exact_rank
from library.lowrank import lowrank_fro_norm_sq
from networks import adapter_from_tensors
from networks.base import Adapter

AUTO = "auto"


def adapter_sq_norm(adapter: Adapter, shape: tuple[int, ...]) -> float:
    """‖ΔW‖_F² of one module (its scale included), exactly, from factors where it has them."""
    rank = exact_rank(adapter)
    if adapter.kind == "lora":
        up, down = adapter.factors()
    elif rank is not None and rank < min(shape[0], math.prod(shape[1:])):
        up, down = adapter.exact_factors()
        up = up * adapter.scale
    else:
        return float(adapter.delta(shape).double().square().sum())
    return float(lowrank_fro_norm_sq(up.double(), down.double()))


def lora_norm(lora) -> float:
    """Nᵢ: the Frobenius norm of the whole file's delta (every module, block weights not applied)."""
    total = 0.0
    for module in lora.modules:
        adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
        total += adapter_sq_norm(adapter, tuple(module.target.shape))
        if adapter.bias_delta is not None:
            total += float(adapter.bias_delta.double().square().sum())
    return math.sqrt(total)


def auto_ratios(loras: Sequence, paths: Sequence[str]) -> list[float]:
    """rᵢ = N̄ / Nᵢ (N̄ = mean of the Nⱼ); a file whose delta is zero is refused (it has no inverse norm)."""
    norms = [lora_norm(lora) for lora in loras]
    for path, norm in zip(paths, norms):
        if not norm > 0 or not math.isfinite(norm):
            raise LoraToolsError(f"--ratios auto: this LoRA's delta has norm {norm:g}; give its ratio by hand",
                                 file=path)
    mean = sum(norms) / len(norms)
    return [mean / n for n in norms]


def is_auto(ratios: Sequence | None) -> bool:
    """True for `--ratios auto`; the word anywhere else among numbers is refused."""
    if ratios is None or AUTO not in ratios:
        return False
    if list(ratios) != [AUTO]:
        raise LoraToolsError("--ratios auto stands alone (one word for all models), not among numbers")
    return True

