"""Write specs per file format: one module per format turns a family's data (its namings, text encoders,
AI-Toolkit style) into `WriteSpec`s, so a new family needs no edit here and a new format is one module."""

from __future__ import annotations

from library.formats.family import Family, WriteSpec
from library.formats.specs import ai_toolkit, comfy, diffusers, kohya

# format name -> its module, in the order formats are listed to users
FORMATS = {"kohya": kohya, "diffusers": diffusers, "ai-toolkit": ai_toolkit, "comfy": comfy}
WRITE_FORMATS = tuple(FORMATS)  # the --format / --to choices (torch-free, so --help needs no torch)


def write_specs(family: Family) -> dict[str, dict[str, WriteSpec]]:
    """format -> component -> WriteSpec for `family` (a format may leave out components it cannot hold)."""
    specs = {name: module.specs(family) for name, module in FORMATS.items()}
    for component, per_format in family.side_components.items():  # LTX-2's connectors: the family says how
        for name, spec in per_format.items():
            specs[name][component] = spec
    return specs
