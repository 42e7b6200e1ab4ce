"""SD3 / SD3.5 (MMDiT): SAI names are canonical (`model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight`).

diffusers splits each fused qkv into to_q/to_k/to_v (x stream) or add_q/k/v_proj (context stream), and the
final modulations (`final_layer.adaLN_modulation.1`, and the last block's context modulation, which only
has shift and scale) store (scale, shift) where SAI has (shift, scale) (formats.md §2.4).
"""

from __future__ import annotations

import re

from library.formats.family import Family, MetadataFacts, TextEncoder

PREFIX = "model.diffusion_model."

_BLOCK = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
          "attn.to_out.0": ("x_block.attn.proj", 0), "ff.net.0.proj": ("x_block.mlp.fc1", 0),
          "ff.net.2": ("x_block.mlp.fc2", 0), "norm1.linear": ("x_block.adaLN_modulation.1", 0),
          "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
          "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.to_out.0": ("x_block.attn2.proj", 0),
          "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
          "attn.add_v_proj": ("context_block.attn.qkv", 2), "attn.to_add_out": ("context_block.attn.proj", 0),
          "ff_context.net.0.proj": ("context_block.mlp.fc1", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0),
          "norm1_context.linear": ("context_block.adaLN_modulation.1", 0)}
_TOP = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", path)
    if m:
        name, order = _BLOCK[m[2]]
        # The last context block keeps only shift and scale (2·hidden rows), in the swapped order.
        swap = m[2] == "norm1_context.linear" and shape[0] == 2 * shape[1]
        return f"joint_blocks.{m[1]}.{name}", order, swap
    return _TOP[path], 0, path == "norm_out.linear"


def make_build(shape_list: str):
    def build(builder, shapes) -> None:
        from library.formats.native_build import build_from_diffusers
        from library.formats.text_encoders import build_clip, build_t5

        build_from_diffusers(builder, shapes(shape_list), inverse_rule, key_prefix=PREFIX, native="sai")
        build_clip(builder, shapes("clip_l"), "te1", TE["te1"].key_prefix, "clip_l")
        build_clip(builder, shapes("clip_g"), "te2", TE["te2"].key_prefix, "clip_g")
        build_t5(builder, shapes("t5xxl"), "t5", TE["t5"].key_prefix)
    return build


def block_id(key: str) -> str | None:
    """J00.. for joint blocks, BASE for text encoders, None elsewhere."""
    if key.startswith("text_encoders."):
        return "BASE"
    m = re.match(r"model\.diffusion_model\.joint_blocks\.(\d+)\.", key)
    return f"J{int(m[1]):02d}" if m else None


TE = {"te1": TextEncoder("clip_l", "clip_l", "lora_te1_", "text_encoder", "text_encoders.clip_l.transformer."),
      "te2": TextEncoder("clip_g", "clip_g", "lora_te2_", "text_encoder_2", "text_encoders.clip_g.transformer."),
      "t5": TextEncoder("t5xxl", "t5", "lora_te3_", "text_encoder_3", "text_encoders.t5xxl.transformer.")}


def make_family(name: str, description: str, hints: tuple[str, ...], metadata: MetadataFacts | None = None) -> Family:
    return Family(
        name=name, description=description,
        namings={"transformer": ("sai", "diffusers"), "te1": ("clip_l",), "te2": ("clip_g",), "t5": ("t5",)},
        read_prefixes=(("lora_unet_", "transformer"), ("lora_transformer_", "transformer"), ("lycoris_", "transformer"),
                       ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "t5"),
                       ("model.diffusion_model.", "transformer"), ("diffusion_model.", "transformer"),
                       ("transformer.base_model.model.", "transformer"), ("base_model.model.", "transformer"),
                       ("transformer.", "transformer"), ("text_encoder.", "te1"), ("text_encoder_2.", "te2"),
                       ("text_encoder_3.", "t5"), ("text_encoders.clip_l.transformer.", "te1"),
                       ("text_encoders.clip_g.transformer.", "te2"), ("text_encoders.t5xxl.transformer.", "t5"),
                       ("", "transformer")),
        native="sai", kohya_naming="sai", ai_toolkit="peft-diffusers", text_encoders=TE,
        block_id=block_id, hints=hints, checkpoint_layouts={"diffusers": ("", "diffusers")},
        metadata=metadata or MetadataFacts(),
    )


FAMILIES = {
    "sd3": (make_family("sd3", "Stable Diffusion 3 medium", ("sd3-medium", "stable-diffusion-3-medium", "sd3_medium"),
                        MetadataFacts(architecture="stable-diffusion-3-medium", resolution="1024x1024",
                                      base_model_version="sd3")),
            make_build("sd3_medium")),
    "sd35_large": (make_family("sd35_large", "Stable Diffusion 3.5 large", ("3.5-large", "sd3.5_large", "sd35_large")),
                   make_build("sd35_large")),
    "sd35_medium": (make_family("sd35_medium", "Stable Diffusion 3.5 medium", ("3.5-medium", "sd3.5_medium",
                                                                                "sd35_medium")),
                    make_build("sd35_medium")),
}
