"""A model family: its module table (loaded from `data/<family>.json`) and how each format names it.

The table lists every canonical target (the base checkpoint's weight key, its full shape, its
component) and, per naming scheme (`ldm`, `diffusers`, `bfl`, `hf`, …), the module paths that map
onto it, each with an optional row slice of a fused weight and an optional half swap (the
scale/shift order of final-layer modulations differs between namings, formats.md §3.4).
Tables are generated once by `tools/gen_format_tables.py` from `reference/shapes/`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")


@dataclass(frozen=True)
class Slot:
    """One module of a naming scheme: where it lands in the canonical weight."""

    key: str
    rows: tuple[int, int] | None = None
    swap: bool = False  # output halves swapped relative to the canonical weight


@dataclass(frozen=True)
class WriteSpec:
    """How one format writes one component: key prefix, naming scheme, flattening, suffixes, alpha."""

    prefix: str
    naming: str
    flat: bool = False  # kohya style: dots of the module path become underscores
    peft: bool = False  # lora_A / lora_B instead of lora_down / lora_up
    alpha: str = "tensor"  # "tensor": `.alpha` keys; "metadata": lora_adapter_metadata; "bake": into the factors
    adapter_name: str | None = None  # component name inside lora_adapter_metadata (diffusers)


class Table:
    """The loaded module table of a family."""

    def __init__(self, data: dict):
        self.shapes: dict[str, tuple[int, ...]] = {k: tuple(v[0]) for k, v in data["targets"].items()}
        self.components: dict[str, str] = {k: v[1] for k, v in data["targets"].items()}
        self.slots: dict[str, dict[str, Slot]] = {
            naming: {path: Slot(s[0], tuple(s[1]) if s[1] is not None else None, bool(s[2])) for path, s in paths.items()}
            for naming, paths in data["slots"].items()}

    @cached_property
    def flat(self) -> dict[str, dict[str, str]]:
        """naming -> flattened path -> dotted path (exact: flattened names are unique per naming, §1.3)."""
        return {naming: {p.replace(".", "_"): p for p in paths} for naming, paths in self.slots.items()}

    @cached_property
    def by_key(self) -> dict[str, dict[str, list[tuple[str, Slot]]]]:
        """naming -> canonical key -> [(path, slot)] in row order."""
        out: dict[str, dict[str, list[tuple[str, Slot]]]] = {}
        for naming, paths in self.slots.items():
            per: dict[str, list[tuple[str, Slot]]] = {}
            for path, slot in paths.items():
                per.setdefault(slot.key, []).append((path, slot))
            for entries in per.values():
                entries.sort(key=lambda e: (e[1].rows or (0, 0))[0])
            out[naming] = per
        return out


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, as each format and the checkpoint name it."""

    name: str  # ComfyUI's encoder name: clip_l, clip_g, clip_h, t5xxl (`text_encoders.<name>.transformer.`)
    naming: str  # the table's naming scheme of its modules (HF paths)
    kohya_prefix: str  # lora_te_, lora_te1_, lora_te2_, lora_te3_
    diffusers_prefix: str  # text_encoder, text_encoder_2, text_encoder_3 (diffusers pipeline component)
    key_prefix: str  # canonical key prefix in the family's single-file checkpoint


@dataclass(frozen=True)
class MetadataFacts:
    """The ss_* / modelspec values sd-scripts writes for this family (None: the key is not written)."""

    architecture: str | None = None  # modelspec.architecture of the base model; a LoRA adds "/lora"
    implementation: str | None = None  # modelspec.implementation
    resolution: str | None = None  # modelspec.resolution
    base_model_version: str | None = None  # ss_base_model_version
    network_module: str = "networks.lora"  # ss_network_module of sd-scripts' trainer for this family
    v2: bool | None = None  # ss_v2 (SD1.x / SD2.x / SDXL only)


@dataclass(frozen=True)
class BlockLayouts:
    """sd-webui-lora-block-weight ("lbw") for a family: block-name lists by their length, the webui's
    presets written for them, and the webui block of a canonical weight key (None: outside every block)."""

    layouts: dict[int, tuple[str, ...]]
    block: Callable[[str], str | None]
    presets: dict[str, str] = field(default_factory=dict)

    @property
    def full(self) -> tuple[str, ...]:
        """The layout that names every block (the longest)."""
        return max(self.layouts.values(), key=len)


@dataclass
class Family:
    """A model family: its module table and naming rules (data), from which readers, the per-format
    writers (`library.formats.specs`), metadata and block weights take everything family-specific."""

    name: str
    description: str
    # component -> naming schemes its modules may use in a file
    namings: dict[str, tuple[str, ...]]
    # (key prefix, component) pairs a reader accepts; a prefix ending in "_" is kohya-flattened
    read_prefixes: tuple[tuple[str, str], ...]
    block_id: Callable[[str], str | None]
    # naming of the main model (UNet / transformer) in the family's own checkpoints and in ComfyUI files
    native: str
    # naming that kohya/musubi-tuner flatten for the main model
    kohya_naming: str
    # how AI-Toolkit saves this family: "kohya-diffusers" (kohya-flattened diffusers names, SD/SDXL),
    # "peft-diffusers" (`transformer.` + diffusers names in PEFT tensors, alpha baked: Flux.1, SD3),
    # "peft-native" (`diffusion_model.` + native names, PEFT tensors, alpha baked: newer models)
    ai_toolkit: str
    text_encoders: dict[str, TextEncoder] = field(default_factory=dict)
    # substrings of ss_base_model_version / modelspec.architecture that name this family
    hints: tuple[str, ...] = ()
    # the family's checkpoint layouts other than the canonical one: name -> (key prefix, naming)
    checkpoint_layouts: dict[str, tuple[str, str]] = field(default_factory=dict)
    metadata: MetadataFacts = MetadataFacts()
    block_weights: BlockLayouts | None = None
    # the family this one derives from with the same module names (Chroma and FLUX.1 Fill from FLUX.1): a
    # LoRA that fits both equally well without a metadata hint is the parent's, and the parent's LoRAs merge
    # into this family's checkpoints on the targets they share (the others dropped with a note, variants.py)
    parent: str | None = None
    # checkpoints of the same module table that people name apart (FLUX.1 Kontext, Qwen-Image-Edit): name ->
    # regular expression over the metadata's model names; only reported (LoraFile.variant), never guessed
    variants: tuple[tuple[str, str], ...] = ()
    # families that win an unhinted tie with this one, being far more common (HunyuanVideo defers to FLUX.1,
    # whose names and widths it shares); unlike `parent`, their LoRAs do not apply to this family's checkpoints
    defers_to: tuple[str, ...] = ()
    # components stored in the same LoRA file besides the main model and the text encoders (LTX-2's text
    # `connectors`): component -> format -> how that format writes it (merged into `write`)
    side_components: dict[str, dict[str, WriteSpec]] = field(default_factory=dict)

    @property
    def main(self) -> str:
        """The main model's component: "unet" or "transformer"."""
        return "unet" if "unet" in self.namings else "transformer"

    @cached_property
    def write(self) -> dict[str, dict[str, WriteSpec]]:
        """format -> component -> how that format writes it (from the per-format modules)."""
        from library.formats.specs import write_specs

        return write_specs(self)

    @cached_property
    def table(self) -> Table:
        with open(DATA_DIR / f"{self.name}.json", encoding="utf-8") as f:
            return Table(json.load(f))


class TableBuilder:
    """Collects targets and slots while a family's rules run over the shape lists (tools only)."""

    def __init__(self):
        self.targets: dict[str, list] = {}
        self.slots: dict[str, dict[str, list]] = {}

    def target(self, key: str, shape: tuple[int, ...], component: str) -> None:
        old = self.targets.get(key)
        if old is not None and (tuple(old[0]) != tuple(shape) or old[1] != component):
            raise ValueError(f"conflicting definitions of {key}: {old} vs {shape}, {component}")
        self.targets[key] = [list(shape), component]

    def slot(self, naming: str, path: str, key: str, rows: tuple[int, int] | None = None, swap: bool = False) -> None:
        if key not in self.targets:
            raise ValueError(f"slot {naming}:{path} points to unknown target {key}")
        paths = self.slots.setdefault(naming, {})
        if path in paths:
            raise ValueError(f"duplicate module {naming}:{path}")
        paths[path] = [key, list(rows) if rows else None, swap]

    def to_json(self) -> dict:
        return {"targets": self.targets, "slots": self.slots}
