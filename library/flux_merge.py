"""Flux.1 glue for flux_merge_lora.py: read Flux LoRAs of any trainer (refusing other models whose names
collide), and find where canonical targets live in a Flux checkpoint: BFL single file, the same under
ComfyUI's `model.diffusion_model.`, the diffusers `transformer` layout (one file or shards), standalone
CLIP-L / T5-XXL files.

The merge itself is the family-agnostic engine of merge_lora.py (library.merge_plan, checkpoint_apply,
lora_combine) and svd_merge_lora.py (svd_merge): a diffusers `to_k` LoRA is a row slice of the canonical
`qkv`, and the layout says which rows of which stored tensor that is (final-layer halves swapped in the
diffusers layout).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from library.console import warn
from library.errors import LoraToolsError
from library.formats import FAMILIES, CheckpointLayout, LoraFile, Target, read_lora
from library.formats.checkpoint import detect_checkpoint_layout, partial_layout
from library.formats.variants import derivative_layout
from library.merge_plan import LoraInput

FAMILY = "flux1"
# component -> (flag name, canonical key prefix of that text encoder), from the family's text encoders
TEXT_ENCODERS = {c: (te.name, te.key_prefix) for c, te in FAMILIES[FAMILY].text_encoders.items()}
# Models outside library.formats whose module names collide with Flux.1's (HunyuanVideo's single blocks
# have `linear1`/`linear2` of the same shapes): named by these words in a LoRA's metadata.
UNLISTED_MODELS = {"hunyuan": "HunyuanVideo", "chroma": "Chroma", "auraflow": "AuraFlow", "ltx": "LTX-Video"}


def _other_model(metadata: dict[str, str]) -> str | None:
    """Another model named by `ss_base_model_version` / `modelspec.architecture`, if any."""
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    if any(h in text for h in FAMILIES[FAMILY].hints):
        return None
    for fam in FAMILIES.values():
        if fam.name != FAMILY and any(h in text for h in fam.hints):
            return fam.description
    return next((model for word, model in UNLISTED_MODELS.items() if word in text), None)


def read_flux_lora(path: str, allow_unmatched: bool = False) -> LoraFile:
    """A Flux.1 LoRA of any supported format; anything else is a clear error naming what it looks like.

    Read as Flux.1 first: this script knows the family, and some Flux.1 module sets also fit other
    families (diffusers `transformer_blocks.N.attn.to_q` is in Qwen-Image too). When the file does not
    fit Flux.1, automatic detection names the family it fits instead.
    """
    try:
        lora = read_lora(path, family=FAMILY, allow_unmatched=allow_unmatched)
    except LoraToolsError as exc:
        try:
            other = read_lora(path)
        except LoraToolsError:
            from library.safetensors_io import LazyReader

            with LazyReader(path) as reader:
                named = _other_model(reader.metadata)
            hint = f" (its metadata says {named})" if named else ""
            raise LoraToolsError(f"not a FLUX.1 LoRA{hint}: {exc.message}", file=path) from None
        raise LoraToolsError(f"this is a {FAMILIES[other.family].description} LoRA, not FLUX.1; "
                             f"use merge_lora.py / svd_merge_lora.py for it", file=path) from None
    other = _other_model(lora.metadata)
    if other:
        raise LoraToolsError(f"the module names fit FLUX.1 but the metadata says {other}, whose layers share "
                             f"Flux's names and shapes; refusing to guess", file=path)
    return lora


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts


def flux_layout(reader) -> CheckpointLayout:
    """The layout of a Flux transformer checkpoint.

    Full checkpoints are recognised by names and shapes (formats' detector); checkpoints with fewer
    blocks (pruned or distilled models, small test files) by names alone, the shapes of the weights we
    change being checked one by one when they are used.
    """
    # Chroma and FLUX.1 Fill checkpoints take FLUX.1 LoRAs on the weights they share (formats.variants)
    found = (derivative_layout(reader, FAMILY) or detect_checkpoint_layout(reader, FAMILY)
             or partial_layout(reader, FAMILY, min_main_keys=4))
    if found is None:
        raise LoraToolsError("not a FLUX.1 transformer checkpoint (no BFL or diffusers Flux weight names found)",
                             file=getattr(reader, "path", None))
    return found


def text_encoder_layout(reader, component: str) -> CheckpointLayout:
    """A standalone CLIP-L / T5-XXL file (HF names), or one that keeps ComfyUI's `text_encoders.…` prefix."""
    flag, prefix = TEXT_ENCODERS[component]
    table = FAMILIES[FAMILY].table
    own = [k for k, c in table.components.items() if c == component]
    keys = set(reader.keys())
    for layout in (CheckpointLayout(FAMILY, strip=prefix), CheckpointLayout(FAMILY)):
        if sum(layout.placements(Target(k, None, component, table.shapes[k]))[0].checkpoint_key in keys
               for k in own) >= min(4, len(own)):
            return layout
    raise LoraToolsError(f"not a {flag} text-encoder checkpoint (none of its weight names found)",
                         file=getattr(reader, "path", None))


def part_of(lora: LoraFile, component: str) -> LoraFile:
    """The modules of `lora` for one model file: "transformer", or a text encoder ("te1" CLIP-L, "t5")."""
    keep = [m for m in lora.modules if (m.target.component if m.target.component in TEXT_ENCODERS else "transformer")
            == component]
    return replace(lora, modules=keep, unmatched=list(lora.unmatched) if component == "transformer" else [])


# ---------------------------------------------------------------------------------------------------------
# Which model file takes which part of the LoRAs


def inputs_for(inputs: list[LoraInput], component: str) -> list[LoraInput]:
    """The inputs restricted to one model file's modules (see part_of)."""
    return [LoraInput(i.path, part_of(i.lora, component), i.ratio) for i in inputs]


@dataclass
class ModelJob:
    component: str  # "transformer", "te1" or "t5"
    model: str  # the checkpoint merged into
    flag: str  # the flag naming the output, for error messages
    save_to: str | None
    layout_of: Callable


def model_jobs(inputs: list[LoraInput], flux_model: str | None, save_to: str | None,
               encoders: dict[str, tuple[str | None, str | None]]) -> tuple[list[ModelJob], list[str]]:
    """One job per model file given (the transformer, and `encoders`: component -> (checkpoint, save_to)),
    and the text-encoder components the LoRAs change but no checkpoint was given for."""
    has = {c: any(i.lora.modules for i in inputs_for(inputs, c)) for c in ("transformer", *TEXT_ENCODERS)}
    if has["transformer"] and not flux_model:
        raise LoraToolsError("the LoRAs change the Flux transformer but no --flux_model was given")
    jobs = [ModelJob("transformer", flux_model, "--save_to", save_to, flux_layout)] if flux_model else []
    left = []
    for comp, (flag, _prefix) in TEXT_ENCODERS.items():
        model, out = encoders.get(comp, (None, None))
        if model:
            jobs.append(ModelJob(comp, model, f"--{flag}_save_to", out, lambda r, c=comp: text_encoder_layout(r, c)))
        elif has[comp]:
            left.append(comp)
    return jobs, left


def leftover_inputs(inputs: list[LoraInput], components: list[str]) -> list[LoraInput]:
    """The inputs' modules of `components` only (text encoders with no checkpoint), files without any dropped."""
    kept = [LoraInput(i.path, replace(i.lora, modules=[m for c in components for m in part_of(i.lora, c).modules]),
                      i.ratio) for i in inputs]
    return [i for i in kept if i.lora.modules]


def te_side_path(save_to: str) -> str:
    """Where leftover text-encoder modules go by default: <save_to>_te_lora.safetensors."""
    stem, _ext = os.path.splitext(save_to)
    return stem + "_te_lora.safetensors"


# ---------------------------------------------------------------------------------------------------------
# What flux_merge_lora.py checks before any work, and prints about its inputs


def check_mode(into_model: bool, mode: str | None, concat: bool, shuffle: bool) -> str:
    """The LoRA+LoRA mode (concat by default), refusing mode flags where they mean nothing or contradict."""
    if into_model and (mode or concat or shuffle):
        raise LoraToolsError("--mode/--concat/--shuffle are for merging LoRAs into one LoRA (without --flux_model)")
    if concat and mode not in (None, "concat"):
        raise LoraToolsError(f"--concat contradicts --mode {mode}")
    return mode or "concat"


def encoder_pairs(encoders: dict[str, tuple[str | None, str | None]]) -> dict[str, tuple[str | None, str | None]]:
    """`encoders` (component -> (checkpoint, save_to)), checked: each checkpoint and its output come together."""
    for comp, (model, out) in encoders.items():
        flag = TEXT_ENCODERS[comp][0]
        if bool(model) != bool(out):
            raise LoraToolsError(f"--{flag} and --{flag}_save_to go together")
    return encoders


def output_flags(save_to: str | None, encoders: dict[str, tuple[str | None, str | None]],
                 te_lora_save_to: str | None, *, into_model: bool) -> dict[str, str | None]:
    """Every output path given, by flag, so that each is checked against the inputs and the others first.
    Into one LoRA, `--save_to` is listed even when absent: it is required there (prepare_output says so)."""
    given = {"--save_to": save_to, "--te_lora_save_to": te_lora_save_to,
             **{f"--{TEXT_ENCODERS[c][0]}_save_to": out for c, (_m, out) in encoders.items()}}
    return {flag: path for flag, path in given.items() if path or (flag == "--save_to" and not into_model)}


def print_inputs(inputs: list[LoraInput]) -> None:
    """One stderr line per LoRA read (format, modules, components); a warning where keys were skipped."""
    for inp in inputs:
        comps = sorted({m.target.component for m in inp.lora.modules})
        print(f"{inp.path}: FLUX.1 {inp.lora.format} LoRA, {len(inp.lora.modules)} modules ({', '.join(comps)})",
              file=sys.stderr)
    for inp in inputs:
        if inp.lora.unmatched:
            warn(f"{inp.path}: {len(inp.lora.unmatched)} keys match nothing and are skipped (--allow_unmatched)")


def checkpoint_meta(reader, model: str, save_to: str, component: str, inputs: list[LoraInput], *, script: str,
                    args: object, models: list[str], minimal: bool) -> dict[str, str]:
    """The merged checkpoint's metadata: its own (all of it with --no_metadata), else updated, with a
    modelspec for the transformer and our provenance."""
    from library.metadata import checkpoint_metadata, modelspec, title_of

    if minimal:
        return dict(reader.metadata)
    merged = [title_of(model, reader.metadata)] + [title_of(i.path, i.lora.metadata) for i in inputs]
    spec = modelspec(FAMILY, save_to, lora=False, merged_from=merged) if component == "transformer" else {}
    return checkpoint_metadata(reader.metadata, script=script, args=args, inputs=models, extra=spec)
