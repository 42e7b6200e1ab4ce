"""The block of every checkpoint key for MBW ratios, pinned for SD1.x, SDXL, Flux and SD3, in the
single-file and the diffusers naming, with the block numbers written out here from the layouts."""

from __future__ import annotations

import re

import pytest

from library.formats.checkpoint import CheckpointLayout
from library.formats.registry import FAMILIES
from library.model_blocks import KeyPlaces, mbw_layouts, parse_mbw

SD_BLOCKS = {"sd1": 12, "sd2": 12, "sdxl": 9}


def sd_expected(key: str) -> str | None:
    if key.startswith(("cond_stage_model.", "conditioner.")):
        return "BASE"
    m = re.match(r"model\.diffusion_model\.(input_blocks|output_blocks)\.(\d+)\.", key)
    if m:
        return ("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}"
    return "M00" if key.startswith("model.diffusion_model.middle_block.") else None


def sd_diffusers_expected(path: str) -> str | None:
    """down_blocks.i.{resnets,attentions}.j is IN(3i+j+1), its downsampler IN(3i+3); up_blocks.i.….j is OUT(3i+j),
    its upsampler OUT(3i+2); conv_in is IN00; the mid block M00 (sd-scripts' convert_unet_state_dict_to_sd)."""
    if path.startswith("conv_in."):
        return "IN00"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"IN{3 * int(m[1]) + int(m[3]) + 1:02d}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", path):
        return f"IN{3 * int(m[1]) + 3:02d}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"OUT{3 * int(m[1]) + int(m[3]):02d}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.", path):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    return "M00" if path.startswith("mid_block.") else None


@pytest.mark.parametrize("family", sorted(SD_BLOCKS))
def test_every_sd_block_of_every_key(family):
    table = FAMILIES[family].table
    places = KeyPlaces(CheckpointLayout(family))
    seen = set()
    for key in table.shapes:
        block = places.block(key)
        assert block == sd_expected(key), key
        bias = key.removesuffix(".weight") + ".bias"
        assert places.block(bias) == block, bias  # a bias is in its weight's block
        seen.add(block)
    n = SD_BLOCKS[family]
    assert seen - {None} == {"BASE", "M00", *(f"IN{i:02d}" for i in range(n)), *(f"OUT{i:02d}" for i in range(n))}
    diffusers = KeyPlaces(CheckpointLayout(family, naming="diffusers"))
    for path in table.slots["diffusers"]:
        assert diffusers.block(path + ".weight") == sd_diffusers_expected(path + "."), path
        assert diffusers.part(path + ".weight") == "unet"


def test_norms_and_edges_of_sd1():
    places = KeyPlaces(CheckpointLayout("sd1"))
    cases = {"model.diffusion_model.input_blocks.4.0.in_layers.0.weight": "IN04",  # GroupNorm of a resnet
             "model.diffusion_model.output_blocks.8.2.conv.bias": "OUT08",
             "model.diffusion_model.middle_block.1.norm.weight": "M00",
             "model.diffusion_model.time_embed.0.weight": None, "model.diffusion_model.out.0.weight": None,
             "cond_stage_model.transformer.text_model.final_layer_norm.bias": "BASE"}
    for key, block in cases.items():
        assert places.block(key) == block, key
    assert places.part("first_stage_model.decoder.conv_in.weight") == "other"
    assert places.part("cond_stage_model.transformer.text_model.embeddings.position_ids") == "te"


@pytest.mark.parametrize("naming", [None, "diffusers"])
def test_every_flux_block(naming):
    fam = FAMILIES["flux1"]
    places = KeyPlaces(CheckpointLayout("flux1", naming=naming))
    keys = list(fam.table.slots["diffusers"]) if naming else [k.removesuffix(".weight") for k in fam.table.shapes]
    seen = set()
    for path in keys:
        if naming:
            m = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", path)
            want = (("D" if m[1] == "transformer_blocks" else "S") + f"{int(m[2]):02d}") if m else None
        else:
            m = re.match(r"(double|single)_blocks\.(\d+)\.", path)
            want = (m[1][0].upper() + f"{int(m[2]):02d}") if m else None
        block = places.block(path + ".weight")
        if want is not None:
            assert block == want, path
        seen.add(block)
    assert {f"D{i:02d}" for i in range(19)} | {f"S{i:02d}" for i in range(38)} <= seen


def test_sd3_joint_blocks_and_the_mbw_lengths():
    places = KeyPlaces(CheckpointLayout("sd3"))
    assert places.block("model.diffusion_model.joint_blocks.7.x_block.attn.qkv.weight") == "J07"
    assert places.block("model.diffusion_model.joint_blocks.7.context_block.attn.ln_q.weight") == "J07"
    assert {n: (names[0], names[-1]) for n, names in mbw_layouts("sd3").items()} == {24: ("J00", "J23"),
                                                                                   25: ("BASE", "J23")}
    assert sorted(mbw_layouts("sd1")) == [25, 26] and sorted(mbw_layouts("sdxl")) == [19, 20]
    assert sorted(mbw_layouts("flux1")) == [57, 59, 61]
    values = parse_mbw(",".join(str(i) for i in range(25)), "sd1")
    assert values["IN00"] == 0 and values["M00"] == 12 and values["OUT11"] == 24 and "BASE" not in values
    values = parse_mbw(",".join(str(i) for i in range(20)), "sdxl")
    assert values["BASE"] == 0 and values["IN08"] == 9 and values["M00"] == 10 and values["OUT08"] == 19
    values = parse_mbw(",".join(str(i) for i in range(57)), "flux1")
    assert values["D00"] == 0 and values["D18"] == 18 and values["S00"] == 19 and values["S37"] == 56
