"""Families that derive from another with the same module names (`Family.parent`) and checkpoints people
name apart within one family (`Family.variants`).

A LoRA of the parent family applies to a derivative's checkpoint on every target the two share with the
same shape: a FLUX.1 LoRA on Chroma (which has no modulation layers, so those modules are dropped), on
FLUX.1 Fill (whose `img_in` is wider). What is dropped is listed, never a KeyError or a silent loss.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from library.errors import LoraToolsError
from library.formats.registry import FAMILIES
from library.formats.types import LoraFile

MAX_LISTED = 8


def variant_of(family: str, metadata: Mapping[str, str]) -> str | None:
    """The variant (e.g. "Kontext", "Edit") the metadata's model names give, None when they name none."""
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture",
                                                          "modelspec.title", "ss_sd_model_name")).lower()
    return next((name for name, pattern in FAMILIES[family].variants if re.search(pattern, text)), None)


def applies_to(lora_family: str, checkpoint_family: str) -> bool:
    """Do LoRAs of `lora_family` apply to checkpoints of `checkpoint_family` (same family, or its parent)?"""
    return lora_family == checkpoint_family or FAMILIES[checkpoint_family].parent == lora_family


def adopt(lora: LoraFile, family: str, path: str | None = None) -> tuple[LoraFile, list[str]]:
    """`lora` on `family`'s targets, and a note naming the modules that have no target there.

    Refuses (naming both families) a LoRA of a family that is neither `family` nor its parent.
    """
    if lora.family == family:
        return lora, []
    if not applies_to(lora.family, family):
        raise LoraToolsError(f"this LoRA is for {lora.family} but the checkpoint is {family}: a "
                             f"{FAMILIES[lora.family].description} LoRA does not apply to "
                             f"{FAMILIES[family].description}", file=path or lora.path)
    table = FAMILIES[family].table
    kept, dropped = [], []
    for module in lora.modules:
        t = module.target
        if table.shapes.get(t.key) == FAMILIES[lora.family].table.shapes[t.key] \
                and table.components[t.key] == t.component:
            kept.append(module)  # same canonical key, same shape: the target is the same
        else:
            dropped.append(module.source or t.describe())
    notes = []
    if dropped:
        shown = ", ".join(dropped[:MAX_LISTED]) + (f" (and {len(dropped) - MAX_LISTED} more)"
                                                    if len(dropped) > MAX_LISTED else "")
        notes.append(f"{path or lora.path}: {len(dropped)} {lora.family} module(s) have no counterpart in "
                     f"{FAMILIES[family].description} and are dropped: {shown}")
    return replace(lora, family=family, modules=kept), notes


def own_targets(family: str) -> list[str]:
    """The weights of a derived family that its parent lacks or shapes otherwise (what tells them apart)."""
    fam = FAMILIES[family]
    parent = FAMILIES[fam.parent].table.shapes
    return [k for k, shape in fam.table.shapes.items() if parent.get(k) != shape]


def derivative_layout(reader, parent: str):
    """The layout of a checkpoint of a family derived from `parent` (Chroma, FLUX.1 Fill), or None: whole or
    thinned, it must store one of the derivative's own weights (`own_targets`) with its own shape."""
    from library.formats.checkpoint import detect_checkpoint_layout, partial_layout
    from library.formats.types import Target

    keys = set(reader.keys())
    for name, fam in FAMILIES.items():
        if fam.parent != parent:
            continue
        layout = detect_checkpoint_layout(reader, name) or partial_layout(reader, name, min_main_keys=1)
        if layout is None:
            continue
        table = fam.table
        for key in own_targets(name):
            places = layout.placements(Target(key, None, table.components[key], table.shapes[key]))
            if len(places) == 1 and places[0].checkpoint_key in keys \
                    and tuple(reader.shape(places[0].checkpoint_key)) == table.shapes[key]:
                return layout
    return None
