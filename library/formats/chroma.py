"""Chroma (a FLUX.1-schnell derivative): BFL names are canonical, as for FLUX.1, but the blocks have no
modulation layers (`img_mod`/`txt_mod`/`modulation`, their diffusers `norm*.linear`) and no time/vector
embedders; a `distilled_guidance_layer` (in_proj, 5 MLP layers, out_proj) produces the modulations instead
(formats.md §2.6). ComfyUI declares `class Chroma(Flux)` and diffusers loads Chroma LoRAs through the Flux
mixin, so a FLUX.1 LoRA applies to Chroma on every target the two share (families-2026 §1.2 #3).
"""

from __future__ import annotations

import re
from dataclasses import replace

from library.formats import flux1
from library.formats.family import Family, MetadataFacts

# diffusers path -> (BFL path, part index): the inverse of flux1's split tables, without modulations.
_DOUBLE = {d: (bfl, i) for bfl, parts in flux1._DOUBLE.items() for i, d in enumerate(parts) if "_mod." not in bfl}
_SINGLE = {d: (bfl, i) for bfl, parts in flux1._SINGLE.items() for i, d in enumerate(parts) if bfl != "modulation.lin"}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
# diffusers renames the guidance MLPs' in_layer/out_layer (single_file_utils.convert_chroma_transformer_…)
_GUIDANCE = {"linear_1": "in_layer", "linear_2": "out_layer"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", path)
    if m:
        double = m[1] == "transformer_blocks"
        name, order = (_DOUBLE if double else _SINGLE)[m[3]]
        return f"{'double' if double else 'single'}_blocks.{m[2]}.{name}", order, False
    m = re.fullmatch(r"distilled_guidance_layer\.layers\.(\d+)\.(linear_[12])", path)
    if m:
        return f"distilled_guidance_layer.layers.{m[1]}.{_GUIDANCE[m[2]]}", 0, False
    if path.startswith("distilled_guidance_layer."):
        return path, 0, False
    return _TOP[path], 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers
    from library.formats.text_encoders import build_t5

    build_from_diffusers(builder, shapes("chroma"), inverse_rule, native="bfl")
    build_t5(builder, shapes("t5xxl"), "t5", flux1.T5.key_prefix)


def block_id(key: str) -> str | None:
    """D00..D18, S00..S37 like FLUX.1, BASE for the T5 encoder, None elsewhere (the guidance layer too)."""
    return flux1.block_id(key)


# ChromaPipeline has one text encoder, T5-XXL, as `text_encoder` (FLUX.1 has it as `text_encoder_2`).
T5 = replace(flux1.T5, diffusers_prefix="text_encoder")

FAMILY = Family(
    name="chroma", description="Chroma (FLUX.1-schnell derivative without modulation layers)",
    namings={"transformer": ("bfl", "diffusers"), "t5": ("t5",)},
    read_prefixes=(("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lycoris_", "transformer"),
                   ("lora_te3_", "t5"), ("lora_te2_", "t5"),
                   ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
                   ("transformer.base_model.model.", "transformer"), ("base_model.model.", "transformer"),
                   ("transformer.", "transformer"), ("text_encoder.", "t5"),
                   ("text_encoders.t5xxl.transformer.", "t5"), ("", "transformer")),
    native="bfl", kohya_naming="bfl",
    ai_toolkit="peft-native",  # AI-Toolkit saves Chroma under `diffusion_model.` with BFL names (formats.md §2.6)
    text_encoders={"t5": T5},
    block_id=block_id,
    hints=("chroma",),
    checkpoint_layouts={"diffusers": ("", "diffusers")},
    metadata=MetadataFacts(architecture="chroma", resolution="1024x1024", base_model_version="chroma",
                           network_module="networks.lora_flux"),
    # the webui's FLUX.1 layout fits: same 19 double and 38 single blocks (the CLIP entry weighs nothing here)
    block_weights=flux1.FAMILY.block_weights,
    parent="flux1",
)
