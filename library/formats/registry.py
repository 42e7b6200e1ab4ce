"""All known families by name, in detection order, and the table builders (tools only)."""

from __future__ import annotations

from library.formats import (
    chroma,
    flux1,
    flux1_fill,
    flux2,
    hidream,
    hunyuan_video,
    hunyuan_video15,
    ltx2,
    ltx23,
    ltxv,
    lumina2,
    qwen_image,
    qwen_image21,
    sd1,
    sd2,
    sd3,
    sdxl,
    wan21,
    wan22,
    z_image,
)
from library.formats.family import Family

_MODULES = (sd1, sd2, sdxl, flux1, flux2, qwen_image, wan21, z_image, chroma, flux1_fill, wan22, hunyuan_video, lumina2,
            ltxv, ltx2, ltx23, hidream, qwen_image21, hunyuan_video15)
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}
BUILDERS = {m.FAMILY.name: m.build for m in _MODULES}
for _name, (_family, _build) in sd3.FAMILIES.items():
    FAMILIES[_name] = _family
    BUILDERS[_name] = _build
