"""SD 1.x: LDM UNet (1×1 conv proj_in/out, 768 context) and the CLIP-L text encoder."""

from library.formats.family import Family
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, writers
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_clip

FAMILY = Family(
    name="sd1", description="Stable Diffusion 1.x",
    namings={"unet": ("diffusers", "ldm"), "te1": ("clip_l",)},
    read_prefixes=read_prefixes(te2=False),
    write=writers("diffusers", {"te1": ("lora_te_", "text_encoder", "clip_l")}),  # kohya trains SD1 on diffusers names
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(12),
    hints=("sd_v1", "stable-diffusion-v1"),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sd15_unet"))
    build_clip(builder, shapes("clip_l"), "te1", "cond_stage_model.transformer.", "clip_l")
