"""FLUX.1 Fill: FLUX.1-dev's module table, but `img_in` (diffusers `x_embedder`) reads 384 input channels
(64 latent + 64 masked-image latent + 256 mask) instead of 64 (formats.md §6 step 4: an `img_in` LoRA input
of 384 identifies Fill). Everything else is FLUX.1's, so FLUX.1 LoRAs without `img_in` apply to Fill as is.
"""

from __future__ import annotations

from dataclasses import replace

from library.formats import flux1

FILL_IN = 384


def build(builder, shapes) -> None:
    def widened(name: str):
        rows = shapes(name)
        if name not in ("flux1_bfl_kohya", "flux1_dev"):
            return rows
        return [(p, k, (s[0], FILL_IN) if p in ("img_in", "x_embedder") else s, b) for p, k, s, b in rows]

    flux1.build(builder, widened)


FAMILY = replace(flux1.FAMILY, name="flux1_fill", description="FLUX.1 Fill (inpainting; img_in reads 384 channels)",
                 hints=("fill",), parent="flux1", variants=(),
                 metadata=replace(flux1.FAMILY.metadata, architecture="flux-1-dev-fill"))
