"""Z-Image: ComfyUI's native (Lumina2/NextDiT) names are canonical, with q/k/v fused in `attention.qkv`;
diffusers and musubi-tuner use split `attention.to_q/k/v` and `to_out.0` (formats.md §2.6)."""

from __future__ import annotations

import re

from library.formats.transformer_family import transformer_family

_ATTN = {"attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
         "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", 0)}
_TOP = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
        "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)", path)
    if m and m[2] in _ATTN:
        name, order = _ATTN[m[2]]
        return f"{m[1]}.{name}", order, False
    return _TOP.get(path, path), 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, shapes("z_image"), inverse_rule, native="comfy")


def block_id(key: str) -> str | None:
    m = re.match(r"(layers|noise_refiner|context_refiner)\.(\d+)\.", key)
    if not m:
        return None
    return {"layers": "L", "noise_refiner": "N", "context_refiner": "C"}[m[1]] + f"{int(m[2]):02d}"


# musubi-tuner trains Z-Image on diffusers names (`lora_unet_layers_0_attention_to_q`).
FAMILY = transformer_family("z_image", "Z-Image", "comfy", block_id, ("z-image", "z_image"), kohya_naming="diffusers",
                            architecture="z-image")
