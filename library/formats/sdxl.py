"""SDXL base: SGM UNet (kohya names it with SGM paths), CLIP-L (TE1) and OpenCLIP-G (TE2, fused in_proj)."""

from library.formats.family import Family
from library.formats.sd_family import CHECKPOINT_LAYOUTS, block_id_for, read_prefixes, writers
from library.formats.sd_unet import build_unet
from library.formats.text_encoders import build_clip, build_openclip

FAMILY = Family(
    name="sdxl", description="Stable Diffusion XL",
    namings={"unet": ("ldm", "diffusers"), "te1": ("clip_l",), "te2": ("clip_g",)},
    read_prefixes=read_prefixes(te2=True),
    write=writers("ldm", {"te1": ("lora_te1_", "text_encoder", "clip_l"),
                          "te2": ("lora_te2_", "text_encoder_2", "clip_g")}),
    checkpoint_layouts=CHECKPOINT_LAYOUTS,
    block_id=block_id_for(9),
    hints=("sdxl", "stable-diffusion-xl"),
)


def build(builder, shapes) -> None:
    build_unet(builder, shapes("sdxl_unet"))
    build_clip(builder, shapes("clip_l"), "te1", "conditioner.embedders.0.transformer.", "clip_l")
    build_openclip(builder, shapes("clip_g"), "te2", "conditioner.embedders.1.model.", "clip_g")
