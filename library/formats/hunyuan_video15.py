"""HunyuanVideo 1.5 (hidden 2048 = 16 heads x 128, 54 double blocks and no single block, MLP 8192, a ByT5
glyph mapper `byt5_in` and a SigLIP `vision_in`). Four namings of one model:

* canonical (`hunyuan`): the Comfy-Org repackaged single file, HunyuanVideo 1.0's original names with each
  double block's q, k, v fused in `img_attn_qkv` / `txt_attn_qkv` (3 x 2048 rows). ComfyUI reads LoRAs on these
  names under `diffusion_model.` / `transformer.` (its HunyuanVideo branch, diffusion-pipe's format).
* `musubi`: Tencent's official checkpoint and musubi-tuner's model, the same names with q, k, v split
  (`img_attn_q`, `img_attn_k`, `img_attn_v`): `lora_unet_double_blocks_0_img_attn_q`, `…_img_mlp_fc1`,
  `…_img_mod_linear` (sd-scripts style).
* `comfy`: ComfyUI's model after it renames a loaded checkpoint (`_mod.linear -> _mod.lin`, `_attn_qkv ->
  _attn.qkv`, `mlp.fc1/fc2 -> mlp.0/2`, `t_embedder/c_embedder/time_in` MLPs -> `in_layer`/`out_layer`), which
  musubi's `convert_hunyuan_video_1_5_lora_to_comfy.py` writes: `lora_unet_double_blocks_0_img_mlp_0`,
  `…_img_mod_lin`, `…_img_attn_qkv`. Read only (every written format uses one of the other namings).
* `diffusers`: `HunyuanVideo15Transformer3DModel` (diffusers' `convert_hunyuan_video1_5_to_diffusers.py`
  mapping: the 1.0 block and refiner names, `context_embedder_2 <- byt5_in.fc1..3`, `image_embedder <-
  vision_in.proj.1/3`, `time_embed <- time_in`, the final modulation half-swapped). diffusers 0.42.1 has no
  LoRA loader mixin for 1.5, but the model takes PEFT adapters.

Fused <-> split goes through library.formats.regroup, as for 1.0: fused -> split keeps lora_A shared and cuts
lora_B by rows (exact for any LoRA); split -> fused stacks the three lora_A and places each lora_B in its own
row and column block (exact; one shared lora_A stays rank r). musubi's reverse converter instead cuts
`lora_down` in three equal parts, which is exact only for a block-diagonal LoRA (families-2026 §1.2 #5).

No reference shape list ships for it: the widths below are the 480p/720p configuration of diffusers' conversion
script, which tests/test_families_hv15.py checks against the model built on the meta device.
"""

from __future__ import annotations

import re
from dataclasses import replace

from library.formats import hunyuan_video
from library.formats.flux2 import block_id  # double blocks numbered as FLUX's: D00…
from library.formats.transformer_family import transformer_family

H, MLP, DOUBLE, REFINERS, LATENT_IN, OUT, TEXT, BYT5, VISION = 2048, 8192, 54, 2, 65, 32, 3584, 1472, 1152

_BLOCK = {"norm1.linear": (6 * H, H), "norm1_context.linear": (6 * H, H),
          **{f"attn.{n}": (H, H) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                            "to_out.0", "to_add_out")},
          "ff.net.0.proj": (MLP, H), "ff.net.2": (H, MLP), "ff_context.net.0.proj": (MLP, H), "ff_context.net.2": (H, MLP)}
_REFINER = {**{f"attn.{n}": (H, H) for n in ("to_q", "to_k", "to_v", "to_out.0")},
            "ff.net.0.proj": (MLP, H), "ff.net.2": (H, MLP), "norm_out.linear": (2 * H, H)}
_TOP = {"x_embedder.proj": (H, LATENT_IN, 1, 1, 1), "image_embedder.linear_1": (VISION, VISION),
        "image_embedder.linear_2": (H, VISION),
        "context_embedder.time_text_embed.timestep_embedder.linear_1": (H, 256),
        "context_embedder.time_text_embed.timestep_embedder.linear_2": (H, H),
        "context_embedder.time_text_embed.text_embedder.linear_1": (H, TEXT),
        "context_embedder.time_text_embed.text_embedder.linear_2": (H, H), "context_embedder.proj_in": (H, TEXT),
        "context_embedder_2.linear_1": (H, BYT5), "context_embedder_2.linear_2": (H, H),
        "context_embedder_2.linear_3": (H, H), "time_embed.timestep_embedder.linear_1": (H, 256),
        "time_embed.timestep_embedder.linear_2": (H, H), "norm_out.linear": (2 * H, H), "proj_out": (OUT, H)}
# the top-level modules 1.5 has and 1.0 lacks (the rest are 1.0's, hunyuan_video.inverse_rule)
_NEW_TOP = {"image_embedder.linear_1": "vision_in.proj.1", "image_embedder.linear_2": "vision_in.proj.3",
            "context_embedder_2.linear_1": "byt5_in.fc1", "context_embedder_2.linear_2": "byt5_in.fc2",
            "context_embedder_2.linear_3": "byt5_in.fc3", "time_embed.timestep_embedder.linear_1": "time_in.mlp.0",
            "time_embed.timestep_embedder.linear_2": "time_in.mlp.2"}
# ComfyUI's renames of a loaded HunyuanVideo checkpoint (comfy/supported_models.py HunyuanVideo), in order
_COMFY_RENAMES = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                  ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                  ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                  ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                  ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."),
                  ("mlp.fc2.", "mlp.2."), ("_attn_proj.", "_attn.proj."), ("_in.mlp.2.", "_in.out_layer."),
                  ("_in.mlp.0.", "_in.in_layer."))
_FUSED_QKV = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn)_qkv")


def diffusers_rows() -> list[tuple[str, str, tuple[int, ...], bool]]:
    """diffusers module path, kind, weight shape, bias: the shape list this family is built from."""
    rows = [(p, "Linear", s, True) for p, s in _TOP.items()]
    for i in range(REFINERS):
        rows += [(f"context_embedder.token_refiner.refiner_blocks.{i}.{p}", "Linear", s, True) for p, s in _REFINER.items()]
    rows += [(f"transformer_blocks.{i}.{p}", "Linear", s, True) for i in range(DOUBLE) for p, s in _BLOCK.items()]
    return rows


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    if path in _NEW_TOP:
        return _NEW_TOP[path], 0, False
    return hunyuan_video.inverse_rule(path, shape)  # 1.0's blocks, refiner and final layer


def comfy_path(path: str) -> str:
    """A canonical module path as ComfyUI's loaded model names it."""
    out = path + "."
    for old, new in _COMFY_RENAMES:
        out = out.replace(old, new)
    return out[:-1]


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, diffusers_rows(), inverse_rule, native="hunyuan")
    for key, (shape, _component) in list(builder.targets.items()):
        path = key[:-len(".weight")]
        builder.slot("comfy", comfy_path(path), key)
        m = _FUSED_QKV.fullmatch(path)
        if m is None:
            builder.slot("musubi", path, key)
            continue
        third = shape[0] // 3
        for i, part in enumerate(("q", "k", "v")):
            builder.slot("musubi", f"{m[1]}_{part}", key, (i * third, (i + 1) * third))


FAMILY = replace(transformer_family("hunyuan_video15", "HunyuanVideo 1.5", "hunyuan", block_id,
                                    ("hunyuan_video_1_5", "hunyuan-video-1.5", "hunyuanvideo1.5", "hv_1_5",
                                     "hunyuan_video15"),
                                    kohya_naming="musubi", architecture="hunyuan-video-1.5"),
                 namings={"transformer": ("hunyuan", "diffusers", "musubi", "comfy")},
                 checkpoint_layouts={"diffusers": ("", "diffusers"), "official": ("", "musubi")})
