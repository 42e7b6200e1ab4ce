"""Lumina-Image 2.0 (and Neta Lumina): the original (ComfyUI) NextDiT names are canonical, with q, k, v fused
in `attention.qkv` **unevenly**: grouped-query attention gives q 2304 rows (24 heads × 96) and k, v 768 each
(8 KV heads), so the fused weight is 3840 × 2304 and diffusers' split is [2304, 768, 768] (a shared lora_A,
lora_B cut by rows). diffusers also renames `attention.out -> attn.to_out.0`, `feed_forward.w1/w2/w3 ->
linear_1/2/3`, `adaLN_modulation.1 -> norm1.linear` (the context refiner has none), and the top level
(`t_embedder.mlp.*`, `cap_embedder.1`, `final_layer.*`) (diffusers `_convert_non_diffusers_lumina2_lora_to_
diffusers` and `convert_lumina2_to_diffusers`; families-2026 §1.2 #8).

No reference shape list ships for it: the widths below are those of diffusers' `Lumina2Transformer2DModel`
default configuration, which tests/test_families_2026_more.py checks against the model built on the meta device.
"""

from __future__ import annotations

import re

from library.formats.transformer_family import transformer_family
from library.formats.z_image import block_id  # the same layers / noise_refiner / context_refiner blocks

H, KV, FFN, ADA, LAYERS, REFINERS, PATCH_IN = 2304, 768, 9216, 1024, 26, 2, 64
_BLOCK = {"attn.to_q": (H, H), "attn.to_k": (KV, H), "attn.to_v": (KV, H), "attn.to_out.0": (H, H),
          "feed_forward.linear_1": (FFN, H), "feed_forward.linear_2": (H, FFN), "feed_forward.linear_3": (FFN, H),
          "norm1.linear": (4 * H, ADA)}
_TOP = {"x_embedder": (H, PATCH_IN), "time_caption_embed.timestep_embedder.linear_1": (ADA, 256),
        "time_caption_embed.timestep_embedder.linear_2": (ADA, ADA), "time_caption_embed.caption_embedder.1": (H, 1024),
        "norm_out.linear_1": (H, ADA), "norm_out.linear_2": (PATCH_IN, H)}
_NATIVE_BLOCK = {"attn.to_q": ("attention.qkv", 0), "attn.to_k": ("attention.qkv", 1), "attn.to_v": ("attention.qkv", 2),
                 "attn.to_out.0": ("attention.out", 0), "feed_forward.linear_1": ("feed_forward.w1", 0),
                 "feed_forward.linear_2": ("feed_forward.w2", 0), "feed_forward.linear_3": ("feed_forward.w3", 0),
                 "norm1.linear": ("adaLN_modulation.1", 0)}
_NATIVE_TOP = {"x_embedder": "x_embedder", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_caption_embed.caption_embedder.1": "cap_embedder.1",
               "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}


def diffusers_rows() -> list[tuple[str, str, tuple[int, ...], bool]]:
    """diffusers module path, kind, weight shape, bias: the shape list this family is built from."""
    rows = [(p, "Linear", s, True) for p, s in _TOP.items()]
    for stack, n in (("layers", LAYERS), ("noise_refiner", REFINERS), ("context_refiner", REFINERS)):
        for i in range(n):
            rows += [(f"{stack}.{i}.{p}", "Linear", s, True) for p, s in _BLOCK.items()
                     if not (stack == "context_refiner" and p == "norm1.linear")]
    return rows


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)", path)
    if m:
        name, order = _NATIVE_BLOCK[m[2]]
        return f"{m[1]}.{name}", order, False
    return _NATIVE_TOP[path], 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, diffusers_rows(), inverse_rule, native="comfy")


# sd-scripts' lora_lumina trains the original names (`lora_unet_layers_0_attention_qkv`)
FAMILY = transformer_family("lumina2", "Lumina-Image 2.0", "comfy", block_id, ("lumina",), architecture="lumina-2")
