"""Qwen-Image: the original release already uses diffusers-style names, so native = diffusers (§2.6)."""

from __future__ import annotations

import re
from dataclasses import replace

from library.formats.transformer_family import transformer_family


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, shapes("qwen_image"), lambda path, shape: (path, 0, False), native="qwen")


def block_id(key: str) -> str | None:
    m = re.match(r"transformer_blocks\.(\d+)\.", key)
    return f"B{int(m[1]):02d}" if m else None


# Qwen-Image-Edit (Edit, Edit-Plus/2509, 2511) keeps Qwen-Image's module paths; only metadata tells it apart.
FAMILY = replace(transformer_family("qwen_image", "Qwen-Image", "qwen", block_id, ("qwen",), architecture="qwen-image"),
                 variants=(("Edit", r"qwen[-_ ]?image[-_ ]?edit"),))
