"""Output names of an extracted LoRA: the `Naming` protocol every naming follows, and the generic names.

`Naming` (implemented by output.GenericNaming and family.FamilyNaming): the script asks it which keys it
can name (`prepare`, `accepts`, `rejected`), what each key becomes (`targets_of`: output module name,
row slice, canonical target), and finally the output tensors (`tensors`); `family` goes into the header.

Generic names, when no model family is involved (generic mode, ComfyUI prefixes):

A module is named after the checkpoint key it was extracted from: `--prefix_lora` + the key with
`--prefix_model` and the trailing `.weight`/`.bias` removed, as ComfyUI's "Extract and Save Lora" does.

Two tensor spellings:
- `peft`: `<module>.lora_A.weight` [r, in(, kh, kw)] and `<module>.lora_B.weight` [out, r(, 1, 1)];
  alpha is not a tensor in PEFT files, so every module's rank and alpha go into the
  `lora_adapter_metadata` JSON (diffusers' convention). We always write alpha = rank, i.e. scale 1, so a
  loader that ignores that metadata still applies the right delta.
- `comfy`: kohya suffixes `<module>.lora_up.weight` / `.lora_down.weight` / `.alpha`, which ComfyUI
  applies to the weight `<module>.weight` of its model whatever the prefix.
Full differences are `<module>.diff` (weight) and `<module>.diff_b` (bias) in both spellings: PEFT
has no such tensors and ComfyUI's loader reads exactly these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from library.extract.styles import GENERIC_STYLES

if TYPE_CHECKING:
    from library.extract.layers import ExtractedLayer

_PEFT_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


class Naming(Protocol):
    """How an extraction names its output (see the module docstring)."""

    family: str | None  # the model family written into the header (None: generic names)

    def prepare(self, keys: Sequence[str]) -> None:
        """Look up what the naming needs about the common keys of both checkpoints (once, before planning)."""

    def accepts(self, key: str) -> bool:
        """Whether the key gets an output module at all."""

    def rejected(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """(key, reason) for the keys `accepts` refuses, for the report."""

    def targets_of(self, key: str) -> list[tuple[str, tuple[int, int] | None, object | None]]:
        """The output module(s) of a key as (name, row slice or None, canonical target or None)."""

    def describe(self) -> str:
        """A few words for the summary line (e.g. "sdxl kohya naming")."""

    def tensors(self, results: Sequence[ExtractedLayer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The output tensors by key and the header entries the naming adds."""


def module_name(key: str, prefix_model: str = "", prefix_lora: str = "") -> str:
    """`prefix_lora` + key after `prefix_model`, without its `.weight`/`.bias` ending."""
    rest = key[len(prefix_model):] if prefix_model and key.startswith(prefix_model) else key
    for ending in (".weight", ".bias"):
        if rest.endswith(ending):
            rest = rest[: -len(ending)]
            break
    return prefix_lora + rest


def generic_tensors(name: str, tensors: Mapping[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """File keys for one module's tensors (keyed by kohya suffix) in the `peft` or `comfy` spelling."""
    if style not in GENERIC_STYLES:
        raise ValueError(f"unknown generic style {style!r}")
    out: dict[str, torch.Tensor] = {}
    for suffix, tensor in tensors.items():
        if style == "peft":
            if suffix == "alpha":
                continue  # carried by lora_adapter_metadata
            suffix = _PEFT_SUFFIXES.get(suffix, suffix)
        out[f"{name}.{suffix}"] = tensor
    return out


def peft_adapter_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, str]:
    """`lora_adapter_metadata` (a PEFT LoraConfig as JSON) describing per-module ranks and alphas.

    The most common rank becomes `r`; modules that differ go into `rank_pattern`/`alpha_pattern`,
    which PEFT matches against module names.
    """
    if not ranks:
        return {}
    values = list(ranks.values())
    r = max(set(values), key=values.count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {name: rank for name, rank in ranks.items() if rank != r},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "peft_type": "LORA",
        "bias": "none",
    }
    return {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}
