"""SD 1.x: LDM UNet (1×1 conv proj_in/out, 768 context) and the CLIP-L text encoder."""

from library.formats.family import Family, MetadataFacts, TextEncoder
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, sd_block_weights
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_clip

TE1 = TextEncoder("clip_l", "clip_l", "lora_te_", "text_encoder", "cond_stage_model.transformer.")

FAMILY = Family(
    name="sd1", description="Stable Diffusion 1.x",
    namings={"unet": ("diffusers", "ldm"), "te1": ("clip_l",)},
    read_prefixes=read_prefixes(te2=False),
    native="ldm", kohya_naming="diffusers",  # kohya trains SD1 on diffusers names
    ai_toolkit="kohya-diffusers",
    text_encoders={"te1": TE1},
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(12),
    hints=("sd_v1", "stable-diffusion-v1"),
    metadata=MetadataFacts(architecture="stable-diffusion-v1", implementation="diffusers", resolution="512x512",
                           base_model_version="sd_v1", v2=False),
    block_weights=sd_block_weights(12),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sd15_unet"))
    build_clip(builder, shapes("clip_l"), "te1", TE1.key_prefix, "clip_l")
