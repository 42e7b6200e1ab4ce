"""LTX-2.3 (22B): LTX-2's naming (ltx2.py) with LTX-2.3's widths (diffusers' "2.3" presets): gated attention
(a `to_gate_logits` of one row per head in every attention), 9 modulation rows per stream instead of 6, the
prompt modulations `prompt_adaln_single` / `audio_prompt_adaln_single` (diffusers `prompt_adaln` /
`audio_prompt_adaln`), no caption projections in the transformer, and one text projection per stream in
the connectors, with bias (`text_embedding_projection.video_aggregate_embed` 188160 -> 4096 and
`audio_aggregate_embed` 188160 -> 2048; diffusers `video_text_proj_in` / `audio_text_proj_in`).

It derives from LTX-2 (`parent`): the blocks have the same names and widths, so a LoRA on them alone is read
as LTX-2 unless its metadata names LTX-2.3, and an LTX-2 LoRA merged into an LTX-2.3 checkpoint applies on
every weight the two share, the others (caption projections, the 6-row modulations) dropped and listed.
"""

from __future__ import annotations

from dataclasses import replace

from library.formats import ltx2

CONFIG = replace(ltx2.CONFIG, gated=True, cross_attn_mod=True, prompt_embeddings=False, per_modality_projections=True)


def build(builder, shapes) -> None:
    ltx2.build_config(builder, CONFIG)


FAMILY = ltx2.ltx2_family("ltx23", "LTX-2.3", ("ltx23", "ltx-2.3", "ltx2.3", "ltx_2_3", "ltx-23"), "ltx-2.3",
                          parent="ltx2")
