"""SD 2.x: LDM UNet (linear proj_in/out, 1024 context) and OpenCLIP-H (23 layers, fused in_proj)."""

from library.formats.family import Family, MetadataFacts, TextEncoder
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, sd_block_weights
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_openclip

TE1 = TextEncoder("clip_h", "clip_h", "lora_te_", "text_encoder", "cond_stage_model.model.")

FAMILY = Family(
    name="sd2", description="Stable Diffusion 2.x",
    namings={"unet": ("diffusers", "ldm"), "te1": ("clip_h",)},
    read_prefixes=read_prefixes(te2=False),
    native="ldm", kohya_naming="diffusers",
    ai_toolkit="kohya-diffusers",
    text_encoders={"te1": TE1},
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(12),
    hints=("sd_v2", "stable-diffusion-v2"),
    metadata=MetadataFacts(architecture="stable-diffusion-v2-512", implementation="diffusers", resolution="512x512",
                           base_model_version="sd_v2", v2=True),
    block_weights=sd_block_weights(12),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sd21_unet"))
    build_openclip(builder, shapes("openclip_h_sd2"), "te1", TE1.key_prefix, "clip_h")
