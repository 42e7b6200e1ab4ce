"""What SD1.x, SD2.x and SDXL share: read prefixes, block ids and the lbw layouts and presets of
sd-webui-lora-block-weight, the metadata sd-scripts writes for them."""

from __future__ import annotations

from library.formats.family import BlockLayouts
from library.formats.sd_unet import block_id as unet_block_id

# Checkpoint layouts besides the LDM single file: a diffusers `unet/` folder or file.
CHECKPOINT_LAYOUTS = {"diffusers": ("", "diffusers")}


def read_prefixes(te2: bool) -> tuple[tuple[str, str], ...]:
    out = [("lora_unet_", "unet"), ("lycoris_", "unet"), ("lora_te1_", "te1"), ("lora_te_", "te1"),
           ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("unet.", "unet"),
           ("text_encoder.", "te1"), ("text_encoders.clip_l.transformer.", "te1"),
           ("text_encoders.clip_h.transformer.", "te1"), ("", "unet")]
    if te2:
        out[2:2] = [("lora_te2_", "te2")]
        out[-1:-1] = [("text_encoder_2.", "te2"), ("text_encoders.clip_g.transformer.", "te2")]
    return tuple(out)


def block_id_for(n_in: int):
    def block_id(key: str) -> str | None:
        if key.startswith(("cond_stage_model.", "conditioner.")):
            return "BASE"
        return unet_block_id(key, n_in)

    return block_id


_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]
# The webui's layouts: 17/26 values for SD1.x/SD2.x (LoRA / full UNet), 12/20 for SDXL. BASE is every
# text-encoder weight; IN<k> / M00 / OUT<k> are the LDM/SGM input_blocks.<k> / middle_block / output_blocks.<k>.
SD_LAYOUTS = {17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]),
              26: ("BASE", *_IN, "M00", *_OUT)}
SDXL_LAYOUTS = {12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]),
                20: ("BASE", *_IN[:9], "M00", *_OUT[:9])}
# The webui's built-in presets (DEF_WEIGHT_PRESET of sd-webui-lora-block-weight), written for 17 values.
SD_PRESETS = {
    "NONE": ",".join(["0"] * 17),
    "ALL": ",".join(["1"] * 17),
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}


def sd_block_weights(n_in: int) -> BlockLayouts:
    """SD1.x/SD2.x (12 input blocks) or SDXL (9)."""
    if n_in == 12:
        return BlockLayouts(SD_LAYOUTS, block_id_for(12), SD_PRESETS)
    return BlockLayouts(SDXL_LAYOUTS, block_id_for(9))
