"""HiDream-I1 (Full/Dev/Fast) and HiDream-E1 (edit): the original code is already diffusers-style, so the
canonical names are diffusers' (`HiDreamImageTransformer2DModel`), the same in ComfyUI's model. 16 double
and 32 single stream blocks, 20 heads x 128 = 2560 wide, each block's image FFN a mixture of experts: one
shared SwiGLU expert (`ff_i.shared_experts.w1/w2/w3`, hidden 3584), 4 routed ones (`ff_i.experts.E.*`, hidden
6912) and the router `ff_i.gate` (a [4, 2560] weight); double blocks add the text stream (`attn1.to_q_t` …
`to_out_t`, a plain SwiGLU `ff_t`). diffusers' converter only strips `diffusion_model.` and prepends
`transformer.`; ComfyUI also reads SimpleTuner's `lycoris_` + flattened names and `transformer.` + dotted
ones (families-2026 §1.2 #7, diffusers `_convert_non_diffusers_hidream_lora_to_diffusers`).

No reference shape list ships for it: the widths below are HiDream-I1's configuration (patch 2, 16 latent
channels, caption channels [4096, 4096], pooled text 2048), which tests/test_families_hidream.py checks
against diffusers' model built on the meta device. E1 keeps I1's keys and shapes (ComfyUI loads both with one
model class, comfy/supported_models.py `HiDream`); only metadata tells it apart (`LoraFile.variant` "E1").
"""

from __future__ import annotations

import re
from dataclasses import replace

from library.formats.transformer_family import transformer_family

DIM, EXPERT, SHARED, TEXT_FF, DOUBLE, SINGLE, EXPERTS = 2560, 6912, 3584, 6912, 16, 32, 4
PATCH_IN, CAPTION, POOLED = 64, 4096, 2048


def _swiglu(prefix: str, hidden: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.w1": (hidden, DIM), f"{prefix}.w2": (DIM, hidden), f"{prefix}.w3": (hidden, DIM)}


def _moe(prefix: str) -> dict[str, tuple[int, int]]:
    out = _swiglu(f"{prefix}.shared_experts", SHARED)
    for e in range(EXPERTS):
        out.update(_swiglu(f"{prefix}.experts.{e}", EXPERT))
    out[f"{prefix}.gate"] = (EXPERTS, DIM)  # the router: a bare weight, not a Linear (PEFT cannot wrap it)
    return out


def _attention(text: bool) -> dict[str, tuple[int, int]]:
    names = ("to_q", "to_k", "to_v", "to_out")
    out = {f"attn1.{n}": (DIM, DIM) for n in names}
    if text:
        out.update({f"attn1.{n}_t": (DIM, DIM) for n in names})
    return out


_DOUBLE_BLOCK = {"adaLN_modulation.1": (12 * DIM, DIM), **_attention(True), **_moe("ff_i"), **_swiglu("ff_t", TEXT_FF)}
_SINGLE_BLOCK = {"adaLN_modulation.1": (6 * DIM, DIM), **_attention(False), **_moe("ff_i")}
_TOP = {"t_embedder.timestep_embedder.linear_1": (DIM, 256), "t_embedder.timestep_embedder.linear_2": (DIM, DIM),
        "p_embedder.pooled_embedder.linear_1": (DIM, POOLED), "p_embedder.pooled_embedder.linear_2": (DIM, DIM),
        "x_embedder.proj": (DIM, PATCH_IN), "final_layer.linear": (PATCH_IN, DIM),
        "final_layer.adaLN_modulation.1": (2 * DIM, DIM),
        # one caption projection per block plus one for the T5 stream
        **{f"caption_projection.{i}.linear": (DIM, CAPTION) for i in range(DOUBLE + SINGLE + 1)}}


def diffusers_rows() -> list[tuple[str, str, tuple[int, ...], bool]]:
    """diffusers module path, kind, weight shape, bias: the shape list this family is built from."""
    rows = [(p, "Linear", s, True) for p, s in _TOP.items()]
    for stack, n, block in (("double_stream_blocks", DOUBLE, _DOUBLE_BLOCK), ("single_stream_blocks", SINGLE, _SINGLE_BLOCK)):
        rows += [(f"{stack}.{i}.block.{p}", "Linear", s, True) for i in range(n) for p, s in block.items()]
    return rows


def build(builder, shapes) -> None:
    from library.formats.native_build import build_from_diffusers

    build_from_diffusers(builder, diffusers_rows(), lambda path, shape: (path, 0, False), native="hidream")


def block_id(key: str) -> str | None:
    m = re.match(r"(double|single)_stream_blocks\.(\d+)\.", key)
    return f"{m[1][0].upper()}{int(m[2]):02d}" if m else None


FAMILY = replace(transformer_family("hidream", "HiDream-I1", "hidream", block_id, ("hidream",),
                                    architecture="hidream-i1"),
                 variants=(("E1", r"hidream[-_ ]?e1"),))
