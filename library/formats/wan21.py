"""Wan 2.1 (14B text-to-video): original Wan names are canonical (`blocks.0.self_attn.q.weight`); every
diffusers module is a 1:1 rename (formats.md §2.6)."""

from __future__ import annotations

import re

from library.formats.transformer_family import transformer_family

_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
          "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
          "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
          "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
_TOP = {"patch_embedding": "patch_embedding", "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2", "condition_embedder.time_proj": "time_projection.1",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2", "proj_out": "head.head",
        "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3"}


def inverse_rule(path: str, shape: tuple[int, ...]) -> tuple[str, int, bool]:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", path)
    if m:
        return f"blocks.{m[1]}.{_BLOCK[m[2]]}", 0, False
    return _TOP[path], 0, False


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, shapes("wan21_14b"), inverse_rule, native="wan")


def block_id(key: str) -> str | None:
    m = re.match(r"blocks\.(\d+)\.", key)
    return f"B{int(m[1]):02d}" if m else None


FAMILY = transformer_family("wan21", "Wan 2.1 14B", "wan", block_id, ("wan",), architecture="wan-2.1")
