"""HunyuanVideo 1.0 (hidden 3072, 20 double + 40 single blocks, a token refiner on the text input): the
original (Tencent) module names are canonical; ComfyUI, musubi-tuner (`lora_unet_double_blocks_0_img_attn_qkv`)
and diffusion-pipe use them. diffusers splits the fused `img_attn_qkv` / `txt_attn_qkv` / refiner
`self_attn_qkv` (3 × 3072 rows) and single-block `linear1` (q, k, v, mlp: 3 × 3072 + 12288) and stores the
final modulation as (scale, shift) where the original has (shift, scale); the refiner's `adaLN_modulation.1`
is not swapped (diffusers `_convert_hunyuan_video_lora_to_diffusers`, formats.md §2.6).

A fused-qkv LoRA becomes three LoRAs with the shared down and the up split by rows, which is exact for any
LoRA; musubi-tuner's reverse converter instead cuts `lora_down` into three equal parts, which is exact only
for block-diagonal LoRAs (families-2026 §1.2 #5): our split and fuse go through library.formats.regroup.

Its flattened and diffusers names collide with FLUX.1's (same widths, same block names up to 19/38): a file
that fits both equally well is FLUX.1's (far more common) unless its metadata says HunyuanVideo.
"""

from __future__ import annotations

import re
from dataclasses import replace

from library.formats.flux2 import block_id  # double/single blocks numbered as FLUX's: D00…, S00…
from library.formats.transformer_family import transformer_family

_DOUBLE = {"norm1.linear": ("img_mod.linear", 0), "norm1_context.linear": ("txt_mod.linear", 0),
           "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", 0),
           "attn.to_add_out": ("txt_attn_proj", 0), "ff.net.0.proj": ("img_mlp.fc1", 0), "ff.net.2": ("img_mlp.fc2", 0),
           "ff_context.net.0.proj": ("txt_mlp.fc1", 0), "ff_context.net.2": ("txt_mlp.fc2", 0)}
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation.linear", 0)}
_REFINER = {"attn.to_q": ("self_attn_qkv", 0), "attn.to_k": ("self_attn_qkv", 1), "attn.to_v": ("self_attn_qkv", 2),
            "attn.to_out.0": ("self_attn_proj", 0), "ff.net.0.proj": ("mlp.fc1", 0), "ff.net.2": ("mlp.fc2", 0),
            "norm_out.linear": ("adaLN_modulation.1", 0)}
_TOP = {"x_embedder.proj": "img_in.proj",
        "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
        "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
        "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
        "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
        "context_embedder.proj_in": "txt_in.input_embedder",
        "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
        "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        name, order = _DOUBLE[m[2]]
        return f"double_blocks.{m[1]}.{name}", order, False
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        name, order = _SINGLE[m[2]]
        return f"single_blocks.{m[1]}.{name}", order, False
    m = re.fullmatch(r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(.+)", path)
    if m:
        name, order = _REFINER[m[2]]
        return f"txt_in.individual_token_refiner.blocks.{m[1]}.{name}", order, False
    return _TOP[path], 0, path == "norm_out.linear"


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, shapes("hunyuan_video"), inverse_rule, native="hunyuan")


FAMILY = replace(transformer_family("hunyuan_video", "HunyuanVideo 1.0", "hunyuan", block_id,
                                    ("hunyuan_video", "hunyuan-video", "hunyuanvideo"), architecture="hunyuan-video"),
                 defers_to=("flux1",))
