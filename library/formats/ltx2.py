"""LTX-2 (Lightricks' audio+video model, 19B): a video stream (32 heads × 128 = 4096) and an audio stream
(32 × 64 = 2048) in each of 48 blocks, joined by audio-to-video and video-to-audio cross-attention, and a
second model in the same file, the text `connectors`, whose input projection LoRAs also train.

Canonical keys are those of the official single file: the transformer under `model.diffusion_model.` with
the original names, the connectors' projection at the top level (`text_embedding_projection.aggregate_embed`,
188160 = 3840 × 49 Gemma-3 hidden states in, no bias). diffusers renames (its
`_convert_non_diffusers_ltx2_lora_to_diffusers` and `convert_ltx2_transformer_to_diffusers`; families-2026
§1.2 #6) only top-level modules, given in RENAMES; the blocks keep their names. The connectors are the
diffusers pipeline's `connectors` component (`aggregate_embed -> text_proj_in`), one LoRA file holding both:
diffusers `transformer.` + `connectors.`; kohya/musubi `lora_unet_` + the flattened original path for both
(what musubi-tuner's `diffusion_model.` -> `lora_unet_` flattening gives); ComfyUI and AI-Toolkit the
original names, the connectors bare (`text_embedding_projection.…`, which diffusers' LTX2LoraLoaderMixin
reads; Lightricks' own files also write it under `diffusion_model.`, read as well, which diffusers routes
into the transformer, where no such module is).

Only the projection of the connectors is mapped (the one diffusers' converter maps); a LoRA on the
connectors' own attention blocks is reported as unmatched. LTX-2.3 (ltx23.py) is the same naming with
other widths (CONFIG_23). No reference shape list ships: the widths are those of diffusers' LTX-2 presets,
which tests/test_families_ltx.py checks against LTX2VideoTransformer3DModel / LTX2TextConnectors built on
the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from library.formats.family import WriteSpec
from library.formats.ltxv import block_id, rename_top
from library.formats.transformer_family import transformer_family

FREQ = 256  # timestep frequency features of every AdaLN-single embedder
PREFIX = "model.diffusion_model."  # the transformer's prefix in the official single file
CONNECTORS_PREFIX = "text_embedding_projection."  # the connectors' projection in that file
# diffusers top-level module -> original name (families-2026 §1.2 #6; the prompt modulations are LTX-2.3's)
RENAMES = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj",
           "time_embed": "adaln_single", "audio_time_embed": "audio_adaln_single",
           "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
           "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
           "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
           "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
           "prompt_adaln": "prompt_adaln_single", "audio_prompt_adaln": "audio_prompt_adaln_single"}
CONNECTOR_RENAMES = {"text_proj_in": "aggregate_embed", "video_text_proj_in": "video_aggregate_embed",
                     "audio_text_proj_in": "audio_aggregate_embed"}


@dataclass(frozen=True)
class Config:
    """The widths that shape the module list (diffusers' config names in the comments)."""

    heads: int = 32  # num_attention_heads
    head_dim: int = 128  # attention_head_dim
    cross: int = 4096  # cross_attention_dim
    audio_heads: int = 32
    audio_head_dim: int = 64
    audio_cross: int = 2048
    channels: int = 128  # in_channels = out_channels
    audio_channels: int = 128
    caption: int = 3840  # caption_channels (Gemma-3-12B hidden size)
    text_layers: int = 49  # connectors' text_proj_in_factor: 48 Gemma layers + the embeddings
    layers: int = 48
    gated: bool = False  # gated_attn / audio_gated_attn: a to_gate_logits per attention
    cross_attn_mod: bool = False  # 9 modulation rows per stream instead of 6, and the prompt AdaLNs
    prompt_embeddings: bool = True  # caption_projection / audio_caption_projection in the transformer
    per_modality_projections: bool = False  # connectors: one text projection per stream (with bias)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def audio_dim(self) -> int:
        return self.audio_heads * self.audio_head_dim


CONFIG = Config()


def _adaln(rows: dict, name: str, dim: int, mods: int) -> None:
    rows.update({f"{name}.emb.timestep_embedder.linear_1": (dim, FREQ), f"{name}.emb.timestep_embedder.linear_2": (dim, dim),
                 f"{name}.linear": (mods * dim, dim)})


def _attention(rows: dict, name: str, query: int, kv: int, inner: int, heads: int, gated: bool) -> None:
    rows.update({f"{name}.to_q": (inner, query), f"{name}.to_k": (inner, kv), f"{name}.to_v": (inner, kv),
                 f"{name}.to_out.0": (query, inner)})
    if gated:
        rows[f"{name}.to_gate_logits"] = (heads, query)


def transformer_rows(c: Config = CONFIG) -> dict[str, tuple[int, ...]]:
    """diffusers path -> weight shape of every Linear of LTX2VideoTransformer3DModel with these widths."""
    v, a = c.dim, c.audio_dim
    mods = 9 if c.cross_attn_mod else 6
    rows: dict[str, tuple[int, ...]] = {"proj_in": (v, c.channels), "audio_proj_in": (a, c.audio_channels)}
    if c.prompt_embeddings:
        rows.update({"caption_projection.linear_1": (v, c.caption), "caption_projection.linear_2": (v, v),
                     "audio_caption_projection.linear_1": (a, c.caption), "audio_caption_projection.linear_2": (a, a)})
    _adaln(rows, "time_embed", v, mods)
    _adaln(rows, "audio_time_embed", a, mods)
    _adaln(rows, "av_cross_attn_video_scale_shift", v, 4)
    _adaln(rows, "av_cross_attn_audio_scale_shift", a, 4)
    _adaln(rows, "av_cross_attn_video_a2v_gate", v, 1)
    _adaln(rows, "av_cross_attn_audio_v2a_gate", a, 1)
    if c.cross_attn_mod:
        _adaln(rows, "prompt_adaln", v, 2)
        _adaln(rows, "audio_prompt_adaln", a, 2)
    for i in range(c.layers):
        b = f"transformer_blocks.{i}."
        _attention(rows, b + "attn1", v, v, v, c.heads, c.gated)
        _attention(rows, b + "audio_attn1", a, a, a, c.audio_heads, c.gated)
        _attention(rows, b + "attn2", v, c.cross, v, c.heads, c.gated)
        _attention(rows, b + "audio_attn2", a, c.audio_cross, a, c.audio_heads, c.gated)
        # a2v: video queries audio, v2a: audio queries video; both at the audio stream's heads and width
        _attention(rows, b + "audio_to_video_attn", v, a, a, c.audio_heads, c.gated)
        _attention(rows, b + "video_to_audio_attn", a, v, a, c.audio_heads, c.gated)
        rows.update({b + "ff.net.0.proj": (4 * v, v), b + "ff.net.2": (v, 4 * v),
                     b + "audio_ff.net.0.proj": (4 * a, a), b + "audio_ff.net.2": (a, 4 * a)})
    rows.update({"proj_out": (c.channels, v), "audio_proj_out": (c.audio_channels, a)})
    return rows


def connector_rows(c: Config = CONFIG) -> dict[str, tuple[int, ...]]:
    """diffusers path -> weight shape of the text projection(s) of LTX2TextConnectors with these widths."""
    features = c.caption * c.text_layers
    if c.per_modality_projections:
        return {"video_text_proj_in": (c.dim, features), "audio_text_proj_in": (c.audio_dim, features)}
    return {"text_proj_in": (c.caption, features)}


def _rows(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str, tuple[int, ...], bool]]:
    return [(p, "Linear", s, True) for p, s in shapes.items()]


def build_config(builder, c: Config) -> None:
    """The table of an LTX-2-shaped family with widths `c` (also used by tests on tiny configurations)."""
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, _rows(transformer_rows(c)), lambda p, s: (rename_top(p, RENAMES), 0, False),
                         native="ltx", key_prefix=PREFIX)
    build_from_diffusers(builder, _rows(connector_rows(c)),
                         lambda p, s: (CONNECTORS_PREFIX + rename_top(p, CONNECTOR_RENAMES), 0, False),
                         component="connectors", native="ltx_connectors", split="diffusers_connectors")


def build(builder, shapes) -> None:
    build_config(builder, CONFIG)


# How each format writes the connectors (component -> format -> spec), next to the transformer's specs.
CONNECTORS_WRITE = {
    "kohya": WriteSpec("lora_unet_", "ltx_connectors", flat=True),
    "diffusers": WriteSpec("connectors.", "diffusers_connectors", peft=True, alpha="metadata",
                           adapter_name="connectors"),
    "ai-toolkit": WriteSpec("", "ltx_connectors", peft=True, alpha="bake"),
    "comfy": WriteSpec("", "ltx_connectors"),
}


def ltx2_family(name: str, description: str, hints: tuple[str, ...], architecture: str, **extra):
    """An LTX-2-shaped family: the transformer as a transformer family, plus the connectors component."""
    base = transformer_family(name, description, "ltx", block_id, hints, architecture=architecture)
    connectors = (("lora_unet_", "connectors"), ("diffusion_model.", "connectors"), ("connectors.", "connectors"),
                  ("", "connectors"))
    return replace(base, namings={**base.namings, "connectors": ("ltx_connectors", "diffusers_connectors")},
                   read_prefixes=base.read_prefixes + connectors, side_components={"connectors": CONNECTORS_WRITE},
                   **extra)


FAMILY = ltx2_family("ltx2", "LTX-2", ("ltx2", "ltx-2"), "ltx-2")
