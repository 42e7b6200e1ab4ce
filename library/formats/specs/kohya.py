"""kohya / sd-scripts / musubi-tuner: `lora_unet_` + the flattened module path, `lora_te*_` for text encoders,
`.alpha` tensors (formats.md §1.1)."""

from __future__ import annotations

from library.formats.family import Family, WriteSpec


def specs(family: Family) -> dict[str, WriteSpec]:
    out = {family.main: WriteSpec("lora_unet_", family.kohya_naming, flat=True)}
    for component, te in family.text_encoders.items():
        out[component] = WriteSpec(te.kohya_prefix, te.naming, flat=True)
    return out
