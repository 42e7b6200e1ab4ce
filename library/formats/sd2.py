"""SD 2.x: LDM UNet (linear proj_in/out, 1024 context) and OpenCLIP-H (23 layers, fused in_proj)."""

from library.formats.family import Family
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, writers
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_openclip

FAMILY = Family(
    name="sd2", description="Stable Diffusion 2.x",
    namings={"unet": ("diffusers", "ldm"), "te1": ("clip_h",)},
    read_prefixes=read_prefixes(te2=False),
    write=writers("diffusers", {"te1": ("lora_te_", "text_encoder", "clip_h")}),
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(12),
    hints=("sd_v2", "stable-diffusion-v2"),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sd21_unet"))
    build_openclip(builder, shapes("openclip_h_sd2"), "te1", "cond_stage_model.model.", "clip_h")
