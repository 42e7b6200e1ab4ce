"""Where diffusers reads a file we write or inspect differently from what it says, and what to do instead.

diffusers 0.42.1 (found by tests/test_formats_diffusers_oracle.py): its kohya SD1/SD2/SDXL path builds PEFT
`alpha_pattern` keys from its old-format names (`…processor.to_k_lora.down.weight`, text encoder `…self_attn`),
which match no module, so every module gets the file's most common alpha. A kohya file whose modules have
different alphas (per-layer ranks from a dynamic resize or extraction, mixed ranks from a concat) therefore
loads in diffusers with wrong scales; the same LoRA in diffusers/PEFT format (alphas in its
`lora_adapter_metadata`) loads exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Families whose kohya files go through diffusers' `_convert_non_diffusers_lora_to_diffusers`.
KOHYA_ALPHA_BUG_FAMILIES = ("sd1", "sd2", "sdxl")


def kohya_alpha_warning(fmt: str, family: str, modules: Iterable[tuple[int | None, float | None]]) -> str | None:
    """The warning for a kohya file that diffusers would load with wrong scales, else None.

    `modules` are (rank, alpha) per module; an absent alpha is the rank (kohya's rule), as diffusers reads it."""
    if fmt != "kohya" or family not in KOHYA_ALPHA_BUG_FAMILIES:
        return None
    alphas = [float(alpha if alpha is not None else rank) for rank, alpha in modules if rank or alpha is not None]
    counts = Counter(alphas)
    if len(counts) < 2:
        return None
    common, kept = counts.most_common(1)[0]
    wrong = len(alphas) - kept
    return (f"diffusers loads this kohya file with one alpha ({common:g}, the most common) for every module, so "
            f"{wrong} of {len(alphas)} modules get a wrong scale (its alpha_pattern bug; the modules have "
            f"{len(counts)} different alphas); `convert_lora.py --to diffusers` writes a file diffusers loads exactly")
