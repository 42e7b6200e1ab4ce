"""Qwen-Image 2.1: a single-stream transformer (32 blocks, 32 heads x 128 = 4096 wide, SwiGLU FFN 3 x 4096,
one shared `modulation.1` for every block), unlike Qwen-Image's 60 dual-stream 3072-wide blocks, so the two
never share a weight shape and a LoRA's shapes tell them apart.

Canonical names are ComfyUI's single-file checkpoint's, which fuses each block's SwiGLU gate and up projections
into one `img_mlp.gate_up` weight, gate rows first (diffusers' `convert_qwen_image21_transformer_checkpoint_to_
diffusers` cuts it in halves into `img_mlp.gate_layer` and `img_mlp.proj`; every other name is diffusers'). A
LoRA trained on diffusers' or musubi-tuner's model (`lora_qwen_image_21`, the same module names) addresses the
two halves, which ComfyUI maps onto `gate_up` at offsets (0, 0, half) and (0, half, half) (families-2026 §1.2
#4). Both layouts are read and written exactly: a LoRA on the fused `gate_up` splits into the halves with its
lora_A shared and lora_B cut by rows; halves fuse back by stacking (block-diagonal, or one shared lora_A when
they have one), all through library.formats.regroup. The ComfyUI and AI-Toolkit formats write `gate_up`
(ComfyUI's own module); diffusers' loader has no rule for it, so give diffusers the diffusers format.

No reference shape list ships for it: the widths are diffusers' `QwenImage21Transformer2DModel` default
configuration, which tests/test_families_qwen21.py checks against the model built on the meta device.
"""

from __future__ import annotations

import re

from library.formats.qwen_image import block_id  # the same `transformer_blocks.N` numbering
from library.formats.transformer_family import transformer_family

DIM, MLP, LAYERS, PATCH_IN, CONTEXT = 4096, 3 * 4096, 32, 64, 4096
_BLOCK = {"attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM), "attn.to_out.0": (DIM, DIM),
          "img_mlp.gate_layer": (MLP, DIM), "img_mlp.proj": (MLP, DIM), "img_mlp.out": (DIM, MLP)}
_TOP = {"img_in": (DIM, PATCH_IN), "txt_in.in_layer": (DIM, CONTEXT), "txt_in.out_layer": (DIM, DIM),
        "time_text_embed.timestep_embedder.linear_1": (DIM, 256),
        "time_text_embed.timestep_embedder.linear_2": (DIM, DIM), "modulation.1": (4 * DIM, DIM),
        "norm_out.linear": (DIM, DIM), "proj_out": (PATCH_IN, DIM)}
# the halves of ComfyUI's fused `gate_up`, in row order (gate first)
_FUSED = {"img_mlp.gate_layer": 0, "img_mlp.proj": 1}


def diffusers_rows() -> list[tuple[str, str, tuple[int, ...], bool]]:
    """diffusers module path, kind, weight shape, bias: the shape list this family is built from."""
    rows = [(p, "Linear", s, False) for p, s in _TOP.items()]
    rows += [(f"transformer_blocks.{i}.{p}", "Linear", s, False) for i in range(LAYERS) for p, s in _BLOCK.items()]
    return rows


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"(transformer_blocks\.\d+)\.(img_mlp\.gate_layer|img_mlp\.proj)", path)
    if m:
        return f"{m[1]}.img_mlp.gate_up", _FUSED[m[2]], False
    return path, 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, diffusers_rows(), inverse_rule, native="comfy")


# musubi-tuner's lora_qwen_image_21 trains its own model, whose module names are diffusers' (the halves).
FAMILY = transformer_family("qwen_image21", "Qwen-Image 2.1", "comfy", block_id,
                           ("qwen-image-2.1", "qwen_image_21", "qwen-image-21", "qwen_image21"),
                           kohya_naming="diffusers", architecture="qwen-image-2.1")
