"""Text-encoder rules: HF CLIP/T5 module paths (what every LoRA format uses) ↔ checkpoint keys.

LoRA files name CLIP modules after transformers' `CLIPTextModel` (`text_model.encoder.layers.N…`);
SD1 and SDXL-TE1 checkpoints store the same layout under a prefix, while SD2 and SDXL-TE2 store
OpenCLIP's `resblocks` with q/k/v fused in `attn.in_proj_weight` (rows q, k, v in that order).
"""

from __future__ import annotations

import re

# Component-major order of OpenCLIP's fused in_proj rows.
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_path(tsv_path: str) -> str:
    """shapes/*.tsv list transformers-5 paths (`encoder.layers…`); LoRA files keep `text_model.` (formats.md §2.7)."""
    return tsv_path if tsv_path.startswith("text_model.") else "text_model." + tsv_path


def openclip_target(path: str, prefix: str, width: int) -> tuple[str, tuple[int, int] | None]:
    """(checkpoint key, rows) of an HF CLIP module path in an OpenCLIP `resblocks` checkpoint."""
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", path)
    if not m:
        raise ValueError(f"no OpenCLIP rule for {path}")
    layer, rest = m[1], m[2]
    base = f"{prefix}transformer.resblocks.{layer}."
    head, _, proj = rest.rpartition(".")
    if head == "self_attn" and proj in _QKV:
        i = _QKV[proj]
        return base + "attn.in_proj_weight", (i * width, (i + 1) * width)
    return base + _OPENCLIP[rest] + ".weight", None


def build_clip(builder, rows, component: str, key_prefix: str, naming: str) -> None:
    """A CLIP encoder whose checkpoint keeps the HF layout under `key_prefix` (SD1, SDXL TE1, SD3/Flux)."""
    for path, _kind, shape, _bias in rows:
        if path == "text_projection":
            continue  # not targeted by kohya; OpenCLIP checkpoints store it transposed (§2.3)
        hf = clip_path(path)
        key = key_prefix + hf + ".weight"
        builder.target(key, shape, component)
        builder.slot(naming, hf, key)


def build_openclip(builder, rows, component: str, key_prefix: str, naming: str) -> None:
    """An OpenCLIP encoder stored as `resblocks` with fused in_proj (SD2, SDXL TE2)."""
    width = next(shape[1] for path, _k, shape, _b in rows if path.endswith("self_attn.q_proj"))
    for path, _kind, shape, _bias in rows:
        if path == "text_projection":
            continue
        hf = clip_path(path)
        key, rows_ = openclip_target(hf, key_prefix, width)
        full = (3 * width, shape[1]) if rows_ else shape
        builder.target(key, full, component)
        builder.slot(naming, hf, key, rows_)


def build_t5(builder, rows, component: str, key_prefix: str, naming: str = "t5") -> None:
    for path, _kind, shape, _bias in rows:
        key = key_prefix + path + ".weight"
        builder.target(key, shape, component)
        builder.slot(naming, path, key)
