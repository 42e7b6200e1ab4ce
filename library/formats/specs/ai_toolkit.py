"""AI-Toolkit (ostris): three styles by family (`Family.ai_toolkit`, formats.md §1.1, §2.1).

kohya-diffusers: SD/SDXL saved with kohya prefixes over flattened diffusers names, `.alpha` tensors.
peft-diffusers: Flux.1 / SD3 saved as `transformer.` + diffusers names in PEFT tensors with alpha = rank,
i.e. no alpha anywhere: the scale is baked into the factors.
peft-native: newer models saved as `diffusion_model.` + native names, PEFT tensors, alpha baked.
"""

from __future__ import annotations

from library.formats.family import Family, WriteSpec


def specs(family: Family) -> dict[str, WriteSpec]:
    style = family.ai_toolkit
    if style == "kohya-diffusers":
        out = {family.main: WriteSpec("lora_unet_", "diffusers", flat=True)}
        out.update({c: WriteSpec(te.kohya_prefix, te.naming, flat=True) for c, te in family.text_encoders.items()})
        return out
    if style == "peft-diffusers":
        out = {family.main: WriteSpec("transformer.", "diffusers", peft=True, alpha="bake")}
        out.update({c: WriteSpec(te.diffusers_prefix + ".", te.naming, peft=True, alpha="bake")
                    for c, te in family.text_encoders.items()})
        return out
    if style == "peft-native":
        # AI-Toolkit trains no text encoders for these models
        return {family.main: WriteSpec("diffusion_model.", family.native, peft=True, alpha="bake")}
    raise ValueError(f"{family.name}: unknown AI-Toolkit style {style!r}")
