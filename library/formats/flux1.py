"""Flux.1 (dev, schnell, Kontext, Krea): BFL module names are canonical (`double_blocks.0.img_attn.qkv.weight`).

diffusers splits the fused qkv (3 × 3072 rows) and single-block linear1 (q, k, v, mlp: 3072 ×3 + 12288)
and stores the final modulation as (scale, shift) where BFL has (shift, scale) (formats.md §3.2–3.4).
"""

from __future__ import annotations

import re

from library.formats.family import BlockLayouts, Family, MetadataFacts, TextEncoder

H = 3072

_DOUBLE = {"img_mod.lin": ["norm1.linear"], "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
           "img_attn.proj": ["attn.to_out.0"], "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
           "txt_mod.lin": ["norm1_context.linear"],
           "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
           "txt_attn.proj": ["attn.to_add_out"], "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
           "modulation.lin": ["norm.linear"]}
_TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out"}
# xlabs LoRA processors (x-flux): qkv_lora on single blocks covers only the q, k, v rows of linear1.
_XLABS_DOUBLE = {"img_attn.qkv": "processor.qkv_lora1", "txt_attn.qkv": "processor.qkv_lora2",
                 "img_attn.proj": "processor.proj_lora1", "txt_attn.proj": "processor.proj_lora2"}


def split_rule(path: str, shape: tuple[int, ...]) -> list[tuple[str, int | None, bool]]:
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", path)
    if m:
        table, prefix = (_DOUBLE, "transformer_blocks") if m[1] == "double" else (_SINGLE, "single_transformer_blocks")
        names = table[m[3]]
        sizes = [H] * 3 + [shape[0] - 3 * H] if len(names) == 4 else [H] * len(names) if len(names) == 3 else [None]
        return [(f"{prefix}.{m[2]}.{n}", s, False) for n, s in zip(names, sizes, strict=True)]
    if path == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", None, True)]
    return [(_TOP[path], None, False)]


def build(builder, shapes) -> None:
    from library.formats.native_build import build_native
    from library.formats.text_encoders import build_clip, build_t5

    build_native(builder, shapes("flux1_bfl_kohya"), shapes("flux1_dev"), split_rule, native="bfl")
    for path, _k, _shape, _b in shapes("flux1_bfl_kohya"):
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", path)
        if m and m[1] == "double" and m[3] in _XLABS_DOUBLE:
            builder.slot("xlabs", f"double_blocks.{m[2]}.{_XLABS_DOUBLE[m[3]]}", path + ".weight")
        elif m and m[3] == "linear1":
            builder.slot("xlabs", f"single_blocks.{m[2]}.processor.qkv_lora", path + ".weight", (0, 3 * H))
            # ComfyUI's alias for the same rows (comfy/lora.py; its USO converter renames qkv_lora to it)
            builder.slot("xlabs", f"single_blocks.{m[2]}.linear1_qkv", path + ".weight", (0, 3 * H))
        elif m and m[3] == "linear2":
            builder.slot("xlabs", f"single_blocks.{m[2]}.processor.proj_lora", path + ".weight")
    build_clip(builder, shapes("clip_l"), "te1", TE1.key_prefix, "clip_l")
    build_t5(builder, shapes("t5xxl"), "t5", T5.key_prefix)


def block_id(key: str) -> str | None:
    """D00..D18 for double blocks, S00..S37 for single blocks, BASE for text encoders, None elsewhere."""
    if key.startswith("text_encoders."):
        return "BASE"
    m = re.match(r"(double|single)_blocks\.(\d+)\.", key)
    return f"{m[1][0].upper()}{int(m[2]):02d}" if m else None


# The webui's Flux layout: 61 values, the text encoders and embedders before the blocks, the final layer last.
FLUX_LAYOUT = ("CLIP", "T5", "IN", *[f"D{i:02d}" for i in range(19)], *[f"S{i:02d}" for i in range(38)], "OUT")
_FLUX_IN = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")


def webui_block(key: str) -> str | None:
    """The webui splits Flux's non-block weights further: CLIP / T5 encoders, input embedders, final layer."""
    block = block_id(key)
    if block == "BASE":
        return "T5" if ".t5xxl." in key else "CLIP"
    if block is None:
        if key.startswith(_FLUX_IN):
            return "IN"
        if key.startswith("final_layer."):
            return "OUT"
    return block


TE1 = TextEncoder("clip_l", "clip_l", "lora_te1_", "text_encoder", "text_encoders.clip_l.transformer.")
T5 = TextEncoder("t5xxl", "t5", "lora_te3_", "text_encoder_2", "text_encoders.t5xxl.transformer.")

FAMILY = Family(
    name="flux1", description="FLUX.1 (dev, schnell and their derivatives)",
    namings={"transformer": ("bfl", "diffusers", "xlabs"), "te1": ("clip_l",), "t5": ("t5",)},
    read_prefixes=(("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lycoris_", "transformer"),
                   ("lora_te1_", "te1"), ("lora_te_", "te1"), ("lora_te3_", "t5"), ("lora_te2_", "t5"),
                   ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
                   ("transformer.base_model.model.", "transformer"), ("base_model.model.", "transformer"),
                   ("transformer.", "transformer"), ("text_encoder.", "te1"), ("text_encoder_2.", "t5"),
                   ("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.t5xxl.transformer.", "t5"),
                   ("", "transformer")),
    native="bfl", kohya_naming="bfl",
    ai_toolkit="peft-diffusers",  # AI-Toolkit saves Flux.1 in PEFT layout with alpha = rank (§1.1)
    text_encoders={"te1": TE1, "t5": T5},
    block_id=block_id,
    hints=("flux1", "flux-1"),
    checkpoint_layouts={"diffusers": ("", "diffusers")},
    metadata=MetadataFacts(architecture="flux-1-dev", implementation="https://github.com/black-forest-labs/flux",
                           resolution="1024x1024", base_model_version="flux1", network_module="networks.lora_flux"),
    block_weights=BlockLayouts({61: FLUX_LAYOUT}, webui_block, {"FLUXALL": ",".join(["1"] * 61)}),
    # Kontext's "weight shapes are 100% compatible with Flux Dev" (diffusion-pipe); Krea-dev too. Krea 2 is
    # another architecture, so "krea2" / "krea-2" is not this variant.
    variants=(("Kontext", r"kontext"), ("Krea", r"krea(?![-_ ]?2)")),
)
