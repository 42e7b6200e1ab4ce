"""LTX-Video 2B (v0.9.x, Lightricks): the original module names are canonical (ComfyUI `diffusion_model.`,
diffusion-pipe, musubi-style `lora_unet_`). diffusers' LTXVideoTransformer3DModel keeps them inside the
blocks (`transformer_blocks.N.attn1.to_q`, `attn2`, `ff.net.0.proj`/`ff.net.2`) and renames two top-level
modules: `patchify_proj -> proj_in`, `adaln_single -> time_embed` (diffusers
`convert_ltx_transformer_checkpoint_to_diffusers`; `q_norm`/`k_norm` are norms, no LoRA targets).

diffusers' own LoRA converter (`_convert_non_diffusers_ltxv_lora_to_diffusers`) maps `diffusion_model.` to
`transformer.` 1:1 without those two renames, so a LoRA on `patchify_proj` or `adaln_single` comes out under
names its model lacks (families-2026 §1.2 #6); ours follow the model.

No reference shape list ships for it: the widths are those of diffusers' default LTXVideoTransformer3DModel
configuration (the 2B: 32 heads × 64 = 2048 wide, 28 blocks, 4096-wide T5 captions, 128 latent channels),
which tests/test_families_ltx.py checks against the model built on the meta device.
"""

from __future__ import annotations

import re

from library.formats.transformer_family import transformer_family

DIM, CROSS, CAPTION, CHANNELS, LAYERS, FREQ = 2048, 2048, 4096, 128, 28, 256
# diffusers top-level module -> original name (the only renames; every other path is the same in both)
RENAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single"}


def diffusers_rows(dim: int = DIM, cross: int = CROSS, caption: int = CAPTION, channels: int = CHANNELS,
                   layers: int = LAYERS) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """diffusers module path, kind, weight shape, bias: every Linear of the transformer of these widths."""
    rows = {"proj_in": (dim, channels), "time_embed.emb.timestep_embedder.linear_1": (dim, FREQ),
            "time_embed.emb.timestep_embedder.linear_2": (dim, dim), "time_embed.linear": (6 * dim, dim),
            "caption_projection.linear_1": (dim, caption), "caption_projection.linear_2": (dim, dim),
            "proj_out": (channels, dim)}
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        for attn, kv in (("attn1", dim), ("attn2", cross)):
            rows.update({b + f"{attn}.to_q": (dim, dim), b + f"{attn}.to_k": (dim, kv), b + f"{attn}.to_v": (dim, kv),
                         b + f"{attn}.to_out.0": (dim, dim)})
        rows.update({b + "ff.net.0.proj": (4 * dim, dim), b + "ff.net.2": (dim, 4 * dim)})
    return [(p, "Linear", s, True) for p, s in rows.items()]


def rename_top(path: str, renames: dict[str, str]) -> str:
    """`path` with its first component renamed by `renames` (diffusers -> original), else unchanged."""
    head, dot, rest = path.partition(".")
    return renames.get(head, head) + dot + rest


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    return rename_top(path, RENAMES), 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, diffusers_rows(), inverse_rule, native="ltx")


def block_id(key: str) -> str | None:
    """B00…B27 for the transformer blocks (also under the single file's `model.diffusion_model.`), None elsewhere."""
    m = re.match(r"(?:model\.diffusion_model\.)?transformer_blocks\.(\d+)\.", key)
    return f"B{int(m[1]):02d}" if m else None


FAMILY = transformer_family("ltxv", "LTX-Video 2B", "ltx", block_id, ("ltxv", "ltx-video", "ltx_video", "ltxvideo"),
                            architecture="ltx-video")
