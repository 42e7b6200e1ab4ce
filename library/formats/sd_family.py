"""What SD1.x, SD2.x and SDXL share: read prefixes, format writers, block ids (webui lora-block-weight)."""

from __future__ import annotations

from library.formats.family import WriteSpec
from library.formats.sd_unet import block_id as unet_block_id

TE_COMFY = {"sd1": "clip_l", "sd2": "clip_h"}
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


def writers(kohya_unet_naming: str, te_names: dict[str, str]) -> dict[str, dict[str, WriteSpec]]:
    """te_names: component -> (kohya prefix, diffusers prefix, ComfyUI encoder name)."""
    kohya = {"unet": WriteSpec("lora_unet_", kohya_unet_naming, flat=True)}
    aitk = {"unet": WriteSpec("lora_unet_", "diffusers", flat=True)}  # AI-Toolkit flattens diffusers names (§2.1)
    diffusers = {"unet": WriteSpec("unet.", "diffusers", peft=True, alpha="metadata", adapter_name="unet")}
    comfy = {"unet": WriteSpec("diffusion_model.", "ldm")}
    for comp, (kp, dp, cname) in te_names.items():
        kohya[comp] = aitk[comp] = WriteSpec(kp, cname, flat=True)
        diffusers[comp] = WriteSpec(dp + ".", cname, peft=True, alpha="metadata", adapter_name=dp)
        comfy[comp] = WriteSpec(f"text_encoders.{cname}.transformer.", cname)
    return {"kohya": kohya, "ai-toolkit": aitk, "diffusers": diffusers, "comfy": comfy}


def block_id_for(n_in: int):
    def block_id(key: str) -> str | None:
        if key.startswith(("cond_stage_model.", "conditioner.")):
            return "BASE"
        return unet_block_id(key, n_in)

    return block_id
