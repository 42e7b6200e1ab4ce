"""All known families by name, in detection order, and the table builders (tools only)."""

from __future__ import annotations

from library.formats import flux1, sd1, sd2, sd3, sdxl
from library.formats.family import Family

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (sd1, sd2, sdxl, flux1)}
BUILDERS = {m.FAMILY.name: m.build for m in (sd1, sd2, sdxl, flux1)}
for _name, (_family, _build) in sd3.FAMILIES.items():
    FAMILIES[_name] = _family
    BUILDERS[_name] = _build
