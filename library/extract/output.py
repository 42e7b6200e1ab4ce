"""Naming and metadata of an extracted LoRA: which keys get a module, what it is called, what goes in the header.

Generic naming (`--format peft|comfy`, or any model of no known family) names modules after the
checkpoint keys (`library/extract/naming.py`). Family naming (kohya, diffusers, ai-toolkit, comfy for
SD1/SD2/SDXL/Flux) asks `library.formats` for the canonical target of each checkpoint key and writes
the modules through its writers, so extracted files use exactly the names our converter reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.errors import AmbiguousFamilyError, LoraToolsError
from library.extract.layers import ExtractedLayer, ExtractOptions
from library.extract.naming import Naming, generic_tensors, module_name, peft_adapter_metadata
from library.extract.pairs import CheckpointPair
from library.extract.styles import GENERIC_STYLES
from library.metadata import lora_metadata


@dataclass
class NamingOptions:
    """How output modules are named (the script's --format, --family, --prefix_model, --prefix_lora, --v2, --sdxl)."""

    format: str | None = None
    family: str | None = None
    prefix_model: str = ""
    prefix_lora: str | None = None
    v2: bool = False  # checked against detection
    sdxl: bool = False


class GenericNaming:
    """Modules named after checkpoint keys: `prefix_lora` + key after `prefix_model`, minus `.weight`/`.bias`."""

    family = None

    def __init__(self, style: str, prefix_model: str = "", prefix_lora: str | None = None):
        if style not in GENERIC_STYLES:
            raise ValueError(style)
        self.style = style
        self.prefix_model = prefix_model
        self.prefix_lora = prefix_model if prefix_lora is None else prefix_lora

    def prepare(self, keys: Sequence[str]) -> None:
        """Nothing to look up: names come from the keys themselves."""

    def accepts(self, key: str) -> bool:
        # Only `.weight`/`.bias` keys have a module to patch (ComfyUI's rule); `in_proj_weight`-style fused
        # tensors need a family's table to be split, so they stay out of generic files.
        return key.endswith((".weight", ".bias"))

    def rejected(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        return [(k, "not a .weight or .bias tensor (generic naming)") for k in keys if not self.accepts(k)]

    def targets_of(self, key: str) -> list[tuple[str, tuple[int, int] | None, object | None]]:
        return [(module_name(key, self.prefix_model, self.prefix_lora), None, None)]

    def describe(self) -> str:
        return f"generic {self.style} naming"

    def tensors(self, results: Sequence[ExtractedLayer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        out: dict[str, torch.Tensor] = {}
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for result in results:
            by_module.setdefault(result.task.name, {}).update(result.tensors)
        for name, tensors in by_module.items():
            for key, tensor in generic_tensors(name, tensors, self.style).items():
                if key in out:
                    raise LoraToolsError("two checkpoint keys give the same output name; choose other prefixes", key=key)
                out[key] = tensor
        extra: dict[str, str] = {}
        if self.style == "peft":
            low = [r for r in results if r.rank is not None]
            extra = peft_adapter_metadata({r.task.name: r.rank for r in low},
                                          {r.task.name: float(r.tensors["alpha"]) for r in low})
        return out, extra


def choose_naming(pair: CheckpointPair, opts: NamingOptions) -> Naming:
    """Generic naming for --format peft (and comfy with explicit prefixes or no family); else the family's."""
    fmt = opts.format
    family = _detect_family(pair, opts)
    if fmt == "peft" or (family is None and fmt in (None, "comfy")):
        if family is None and fmt is None:
            print("no known model family detected: writing generic PEFT-style names (lora_A/lora_B)")
        return GenericNaming(fmt or "peft", opts.prefix_model, opts.prefix_lora)
    if fmt == "comfy" and opts.prefix_lora is not None:
        return GenericNaming("comfy", opts.prefix_model, opts.prefix_lora)
    if family is None:
        raise LoraToolsError(f"--format {fmt} needs a known model family, and none was detected; use --format peft "
                             "or comfy, or name it with --family", file=pair.base_path)
    from library.extract.family import FamilyNaming

    return FamilyNaming(pair, family, fmt or "kohya")


def _detect_family(pair: CheckpointPair, opts: NamingOptions) -> str | None:
    """The family of both checkpoints (they must agree), checked against --v2 / --sdxl / --family."""
    from library.formats import FAMILIES, detect_checkpoint_family

    if opts.family:
        if opts.family not in FAMILIES:
            raise LoraToolsError(f"unknown --family {opts.family!r}; known: {', '.join(FAMILIES)}")
        return opts.family
    base = _detect_one(detect_checkpoint_family, pair.base, pair.base_path)
    tuned = _detect_one(detect_checkpoint_family, pair.tuned, pair.tuned_path)
    if base != tuned:
        raise LoraToolsError(f"the base model is {base or 'of no known family'} but the tuned model is "
                             f"{tuned or 'of no known family'}; extraction needs two checkpoints of the same model",
                             file=pair.tuned_path)
    expected = "sdxl" if opts.sdxl else "sd2" if opts.v2 else None
    if expected and base != expected:
        raise LoraToolsError(f"--{'sdxl' if expected == 'sdxl' else 'v2'} was given but the checkpoint is "
                             f"{base or 'of no known family'}", file=pair.base_path)
    return base


def _detect_one(detect, reader, path: str) -> str | None:
    try:
        return detect(reader)
    except AmbiguousFamilyError:
        raise
    except LoraToolsError:
        return None


def output_tensors_and_metadata(results: Sequence[ExtractedLayer], naming: Naming, options: ExtractOptions, save_to: str, *,
                                v_parameterization: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The output tensors and header: dims/alphas, module type, family facts. The LoRA writer
    (library.lora_output.write_named_tensors) adds the provenance, or keeps only what loaders need."""
    tensors, extra = naming.tensors(results)
    low = [r for r in results if r.rank is not None]
    network_args = {}
    if options.conv_dim is not None:
        network_args = {"conv_dim": str(options.conv_dim), "conv_alpha": str(options.conv_dim)}
    extra = dict(extra, ss_network_args=json.dumps(network_args))
    if options.lora_type == "full_diff" or not low:
        extra["ss_network_module"] = "lycoris.kohya"
        extra["ss_network_args"] = json.dumps({"algo": "full"})
    meta = lora_metadata(None, family=naming.family, ranks=[r.rank for r in low] or [0],
                         alphas=[float(r.tensors["alpha"]) for r in low] or [0],
                         save_to=save_to, network_module=extra.pop("ss_network_module", None), extra=extra)
    if v_parameterization and naming.family == "sd2":
        meta["ss_base_model_version"] = "sd_v2_v"
        meta["ss_v2"] = "True"
    return tensors, meta
