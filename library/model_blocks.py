"""Where a checkpoint key lives in its model: its block (for MBW ratios) and its part (UNet/transformer or
text encoder, for --te_ratio and --only).

Family facts only come from `library.formats`: the family's module table, its checkpoint layout (canonical,
prefixed, stripped or diffusers naming) and its block ids (the webui lbw blocks where the family has
them: SD1.x/SD2.x IN00…IN11, M00, OUT00…OUT11; SDXL IN00…IN08, M00, OUT00…OUT08; Flux D00…D18, S00…S37;
SD3 J00…; BASE/CLIP/T5 for text encoders). The table lists the weights of Linear/Conv modules; a bias or a
norm of the same module or block gets the block of the longest module path it shares with a listed
weight, so `input_blocks.1.1.norm.bias` is IN01 and a diffusers `down_blocks.1.resnets.0.norm1.weight`
is IN04, without any naming rule of its own.

MBW strings (supermerger's "merge block weighted") give one ratio per block in the family's full layout
order, with or without the text-encoder entries (SD1.x 26 or 25 values, SDXL 20 or 19, Flux 61, 59 or the
57 double/single blocks, SD3 one per joint block, with or without BASE). Blocks a layout leaves out and
keys outside every block (time embeddings, conv_out, final norms) keep ratio 1.
"""

from __future__ import annotations

import json
import math
from functools import cached_property

from library.block_weights import webui_block
from library.errors import LoraToolsError
from library.formats.checkpoint import MAIN_COMPONENTS, CheckpointLayout
from library.formats.registry import FAMILIES
from library.formats.types import Target

TEXT_ENCODER_BLOCKS = ("BASE", "CLIP", "T5")
EDGE_BLOCKS = ("IN", "OUT")  # Flux's embedders and final layer: not numbered blocks
# Key prefixes of text encoders in files of no known family (sd-scripts' and ComfyUI's names).
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.embedders.", "text_encoders.", "text_encoder.",
                         "text_encoder_2.", "text_model.", "te.", "te1.", "te2.")


def block_names(family: str) -> tuple[str, ...]:
    """Every block of `family` in layout order: the webui's full lbw layout, else the family's block ids."""
    fam = FAMILIES[family]
    if fam.block_weights is not None:
        return fam.block_weights.full
    ids = {fam.block_id(key) for key in fam.table.shapes} - {None}
    return tuple(sorted(ids, key=lambda b: (b not in TEXT_ENCODER_BLOCKS, b)))


def mbw_layouts(family: str) -> dict[int, tuple[str, ...]]:
    """The block lists an MBW string of `family` may give, by their length."""
    full = block_names(family)
    no_te = tuple(b for b in full if b not in TEXT_ENCODER_BLOCKS)
    numbered = tuple(b for b in no_te if b not in EDGE_BLOCKS)
    return {len(names): names for names in (numbered, no_te, full) if names}


def parse_mbw(text: str, family: str | None) -> dict[str, float]:
    """An MBW string (comma list or JSON list of numbers) → ratio per block name."""
    if family is None:
        raise LoraToolsError("--block_weights needs the model family; it was not detected, give --family")
    stripped = text.strip()
    try:
        items = json.loads(stripped) if stripped.startswith("[") else stripped.split(",")
        values = [float(v) for v in items]
    except (ValueError, TypeError):
        raise LoraToolsError(f"--block_weights {text!r}: expected comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise LoraToolsError(f"--block_weights {text!r}: values must be finite")
    layouts = mbw_layouts(family)
    if len(values) not in layouts:
        raise LoraToolsError(f"--block_weights has {len(values)} values; a {family} model takes "
                             f"{' or '.join(map(str, sorted(layouts)))} ({', '.join(layouts[max(layouts)])})")
    return dict(zip(layouts[len(values)], values))


class KeyPlaces:
    """Block and part of every key of checkpoints with `layout` (None: a key set of no known family)."""

    def __init__(self, layout: CheckpointLayout | None):
        self.layout = layout

    @cached_property
    def _prefixes(self) -> dict[str, tuple[set, set]]:
        """Every dot-prefix of every module path of the layout → (blocks, components) of the weights under it."""
        out: dict[str, tuple[set, set]] = {}
        layout = self.layout
        if layout is None:
            return out
        fam = layout.family
        for key, shape in fam.table.shapes.items():
            component = fam.table.components[key]
            block = webui_block(fam.name, key)
            for placement in layout.placements(Target(key, None, component, shape)):
                parts = placement.checkpoint_key.removesuffix(".weight").split(".")
                for n in range(1, len(parts) + 1):
                    blocks, comps = out.setdefault(".".join(parts[:n]), (set(), set()))
                    blocks.add(block)
                    comps.add(component)
        return out

    def _walk(self, key: str):
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            hit = self._prefixes.get(".".join(parts[:n]))
            if hit is not None:
                yield hit

    def block(self, key: str) -> str | None:
        """The block of `key`: that of the longest module path it shares with the table, if only one."""
        for blocks, _ in self._walk(key):
            return next(iter(blocks)) if len(blocks) == 1 else None
        return None

    def part(self, key: str) -> str:
        """"unet" (the main model: UNet or transformer), "te" (a text encoder) or "other" (VAE, buffers, …)."""
        for _, comps in self._walk(key):
            if len(comps) == 1:
                return "unet" if next(iter(comps)) in MAIN_COMPONENTS else "te"
        if key.startswith(TEXT_ENCODER_PREFIXES):
            return "te"
        if key.startswith(("model.diffusion_model.", "diffusion_model.")):
            return "unet"
        if self.layout is not None and self.layout.naming is not None and not self.layout.prefix:
            return "unet"  # a diffusers unet/transformer folder holds nothing else (conv_norm_out, …)
        return "other"
