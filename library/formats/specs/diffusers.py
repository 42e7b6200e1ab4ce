"""diffusers / PEFT: pipeline component + "." + diffusers module path, `lora_A` / `lora_B` tensors, alpha in
the `lora_adapter_metadata` header, one adapter config per component (formats.md §1.1)."""

from __future__ import annotations

from library.formats.family import Family, WriteSpec


def specs(family: Family) -> dict[str, WriteSpec]:
    out = {family.main: WriteSpec(family.main + ".", "diffusers", peft=True, alpha="metadata", adapter_name=family.main)}
    for component, te in family.text_encoders.items():
        out[component] = WriteSpec(te.diffusers_prefix + ".", te.naming, peft=True, alpha="metadata",
                                   adapter_name=te.diffusers_prefix)
    return out
