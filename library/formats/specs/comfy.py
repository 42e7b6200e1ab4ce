"""ComfyUI: `diffusion_model.` + the native (checkpoint) module path, `text_encoders.<name>.transformer.` + HF
paths for text encoders, kohya/LyCORIS tensor suffixes with `.alpha`."""

from __future__ import annotations

from library.formats.family import Family, WriteSpec


def specs(family: Family) -> dict[str, WriteSpec]:
    out = {family.main: WriteSpec("diffusion_model.", family.native)}
    for component, te in family.text_encoders.items():
        out[component] = WriteSpec(f"text_encoders.{te.name}.transformer.", te.naming)
    return out
