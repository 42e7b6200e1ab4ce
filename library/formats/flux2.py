"""FLUX.2 (dev): BFL names canonical; diffusers splits the double-block qkv but keeps single-block linear1
fused (`to_qkv_mlp_proj`), and stores the final modulation as (scale, shift) (formats.md §2.6)."""

from __future__ import annotations

import re

from library.formats.transformer_family import transformer_family

_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
           "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
           "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", 0),
           "attn.to_add_out": ("txt_attn.proj", 0), "ff.linear_in": ("img_mlp.0", 0), "ff.linear_out": ("img_mlp.2", 0),
           "ff_context.linear_in": ("txt_mlp.0", 0), "ff_context.linear_out": ("txt_mlp.2", 0)}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {"double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin", "x_embedder": "img_in",
        "context_embedder": "txt_in", "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer", "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        name, order = _DOUBLE[m[2]]
        return f"double_blocks.{m[1]}.{name}", order, False
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        return f"single_blocks.{m[1]}.{_SINGLE[m[2]]}", 0, False
    return _TOP[path], 0, path == "norm_out.linear"


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, shapes("flux2_dev"), inverse_rule, native="bfl")


def block_id(key: str) -> str | None:
    m = re.match(r"(double|single)_blocks\.(\d+)\.", key)
    return f"{m[1][0].upper()}{int(m[2]):02d}" if m else None


FAMILY = transformer_family("flux2", "FLUX.2 dev", "bfl", block_id, ("flux2", "flux-2"), architecture="flux-2-dev")
