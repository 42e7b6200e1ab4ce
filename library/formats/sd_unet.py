"""SD1.x / SD2.x / SDXL UNet rules: diffusers module paths ↔ LDM/SGM paths, and webui block ids.

Both namings share the inside of a transformer container; only container paths and ResNet
sub-module names differ (formats.md §4.1). `layers_per_block` is 2 for every SD family.
"""

from __future__ import annotations

import re

LDM_PREFIX = "model.diffusion_model."
LAYERS = 2  # layers per block in SD1/SD2/SDXL

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2",
        "conv_norm_out": "out.0"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET[head] + ("." + tail if tail else "")


def ldm_path(path: str, up_levels_with_attention: set[int]) -> str:
    """The LDM/SGM module path of a diffusers UNet module path.

    The upsampler position depends on whether its up level has attentions (SD1 up level 0 has none:
    `output_blocks.2.1.conv`; otherwise `.2.conv`), so the caller says which levels have them.
    """
    if path in _TOP:
        return _TOP[path]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (LAYERS + 1) + j + 1
        return f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (LAYERS + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (LAYERS + 1) + j
        return f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        i = int(m[1])
        pos = 2 if i in up_levels_with_attention else 1
        return f"output_blocks.{i * (LAYERS + 1) + LAYERS}.{pos}.conv"
    raise ValueError(f"no LDM rule for UNet module {path}")


def up_levels_with_attention(paths: list[str]) -> set[int]:
    return {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}


def block_id(key: str, n_in: int) -> str | None:
    """webui lora-block-weight id of an LDM UNet key: IN00.., M00, OUT00..; None outside the blocks.

    `n_in` is the number of input blocks (12 for SD1/SD2, 9 for SDXL); the output blocks mirror them.
    """
    path = key[len(LDM_PREFIX):] if key.startswith(LDM_PREFIX) else key
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", path)
    if m:
        n = int(m[2])
        if n >= n_in:
            return None
        return f"{'IN' if m[1] == 'input_blocks' else 'OUT'}{n:02d}"
    if path.startswith("middle_block."):
        return "M00"
    return None


def build_unet(builder, rows) -> None:
    """Canonical LDM keys for every Linear/Conv of a diffusers-named UNet shape list, in both namings."""
    paths = [r[0] for r in rows]
    with_attention = up_levels_with_attention(paths)
    for path, _kind, shape, _bias in rows:
        ldm = ldm_path(path, with_attention)
        key = LDM_PREFIX + ldm + ".weight"
        builder.target(key, shape, "unet")
        builder.slot("diffusers", path, key)
        builder.slot("ldm", ldm, key)
