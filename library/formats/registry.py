"""All known families by name, in detection order."""

from __future__ import annotations

from library.formats import flux1, sd1, sd2, sdxl
from library.formats.family import Family

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (sd1, sd2, sdxl, flux1)}
BUILDERS = {m.FAMILY.name: m.build for m in (sd1, sd2, sdxl, flux1)}
