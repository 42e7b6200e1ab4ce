"""SDXL base: SGM UNet (kohya names it with SGM paths), CLIP-L (TE1) and OpenCLIP-G (TE2, fused in_proj)."""

from library.formats.family import Family, MetadataFacts, TextEncoder
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, sd_block_weights
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_clip, build_openclip

TE1 = TextEncoder("clip_l", "clip_l", "lora_te1_", "text_encoder", "conditioner.embedders.0.transformer.")
TE2 = TextEncoder("clip_g", "clip_g", "lora_te2_", "text_encoder_2", "conditioner.embedders.1.model.")

FAMILY = Family(
    name="sdxl", description="Stable Diffusion XL",
    namings={"unet": ("ldm", "diffusers"), "te1": ("clip_l",), "te2": ("clip_g",)},
    read_prefixes=read_prefixes(te2=True),
    native="ldm", kohya_naming="ldm",
    ai_toolkit="kohya-diffusers",
    text_encoders={"te1": TE1, "te2": TE2},
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(9),
    hints=("sdxl", "stable-diffusion-xl"),
    metadata=MetadataFacts(architecture="stable-diffusion-xl-v1-base",
                           implementation="https://github.com/Stability-AI/generative-models", resolution="1024x1024",
                           base_model_version="sdxl_base_v1-0", v2=False),
    block_weights=sd_block_weights(9),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sdxl_unet"))
    build_clip(builder, shapes("clip_l"), "te1", TE1.key_prefix, "clip_l")
    build_openclip(builder, shapes("clip_g"), "te2", TE2.key_prefix, "clip_g")
