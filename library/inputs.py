"""The input stage of every script that merges LoRAs: read the files, settle each one's model family,
pair it with its strength and block weights, and group the modules by canonical target.

A file whose keys fit several families equally well (SD1 and SD2 share most shapes) raises
AmbiguousFamilyError; it then takes the family the caller knows (the checkpoint's, or --family), else
the one family of the other inputs. Grouping by target is library.lora_combine.group_targets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from library.errors import AmbiguousFamilyError, LoraToolsError
from library.merge_plan import LoraInput


def ratios_for(ratios: Sequence[float] | None, models: Sequence[str]) -> list[float]:
    """--ratios checked against --models; 1 each when not given; `auto` (library.auto_ratios) once the files are
    read (lora_inputs), until then 1 each."""
    from library.auto_ratios import is_auto

    if is_auto(ratios):
        return [1.0] * len(models)
    if ratios is not None and len(ratios) != len(models):
        raise LoraToolsError(f"--ratios has {len(ratios)} values but {len(models)} models were given")
    return [float(r) for r in ratios] if ratios is not None else [1.0] * len(models)


def read_loras(paths: Sequence[str], family: str | None = None, allow_unmatched: bool = False,
               *, family_from: str = "--family") -> list:
    """The LoRAs, each with its family. `family` (from `family_from`: "--family" or "checkpoint") is
    only a fallback for files whose family is ambiguous, and a check that they fit it."""
    from library.formats import read_lora

    loras: dict[str, object] = {}
    ambiguous: dict[str, AmbiguousFamilyError] = {}
    for path in paths:
        try:
            loras[path] = read_lora(path, allow_unmatched=allow_unmatched)
        except AmbiguousFamilyError as exc:
            ambiguous[path] = exc
    if ambiguous:
        known = {lora.family for lora in loras.values()}
        fallback = family or (known.pop() if len(known) == 1 else None)
        source = family_from if family else "other LoRAs"
        for path, exc in ambiguous.items():
            if fallback is None:
                raise exc
            try:
                loras[path] = read_lora(path, family=fallback, allow_unmatched=allow_unmatched)
            except LoraToolsError:
                raise LoraToolsError(f"this LoRA is not for {fallback}, the family of the {source} "
                                     f"({exc.message})", file=path) from None
    return [loras[p] for p in paths]


def lora_inputs(paths: Sequence[str], ratios: Sequence[float] | None, block_weights: Sequence | None = None, *,
                family: str | None = None, allow_unmatched: bool = False, family_from: str = "--family",
                reader: Callable[[str], object] | None = None) -> list[LoraInput]:
    """One LoraInput per file: the LoRA (read by `reader`, default read_loras' family rule), its ratio
    (default 1; `["auto"]`: library.auto_ratios, printed) and its block weights (None each when not given)."""
    strengths = ratios_for(ratios, paths)
    weights = list(block_weights) if block_weights is not None else [None] * len(paths)
    if reader is not None:
        loras = [reader(p) for p in paths]
    else:
        loras = read_loras(paths, family, allow_unmatched, family_from=family_from)
    from library.auto_ratios import auto_ratios, is_auto  # imports torch: only once files are read

    if is_auto(ratios):
        strengths = auto_ratios(loras, paths)
        print("--ratios auto (mean norm / each file's delta norm): "
              + ", ".join(f"{os.path.basename(p)} {r:.4g}" for p, r in zip(paths, strengths)))
    return [LoraInput(p, lora, r, bw) for p, lora, r, bw in zip(paths, loras, strengths, weights, strict=True)]
