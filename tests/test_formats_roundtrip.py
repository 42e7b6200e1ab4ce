"""Every family × every written format: A → B → A keeps the key set bit for bit and every delta.

Fixtures carry the real module names and shapes of each family (rank 2); deltas are compared per
module on random probes in float64 (tests/test_formats_fixtures.py), independently of our tables.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from library.formats import lora_from_tensors, lora_tensors
from tests.helpers import assert_same_deltas, diffusers_fixture, kohya_fixture, needs_shapes, probe_deltas

FAMILIES = ("sd1", "sd2", "sdxl", "flux1", "sd3", "sd35_medium", "sd35_large", "flux2", "qwen_image", "wan21", "z_image")
# Families whose kohya names the reference lists directly; the others start from their diffusers names.
KOHYA_LISTED = ("sd1", "sd2", "sdxl", "flux1")
FORMATS = ("kohya", "diffusers", "ai-toolkit", "comfy")


@lru_cache(maxsize=8)
def start(family: str, fmt: str):
    """A file of `family` in format `fmt`: built by hand for kohya and diffusers, by our writer otherwise."""
    if fmt == "kohya" and family in KOHYA_LISTED:
        return kohya_fixture(family), {}
    if fmt == "diffusers":
        return diffusers_fixture(family)
    tensors, meta = (kohya_fixture(family), {}) if family in KOHYA_LISTED else diffusers_fixture(family)
    return lora_tensors(lora_from_tensors(tensors, meta, family=family).modules, family, fmt)


def convert(tensors, meta, family, fmt):
    # Thinned files can be ambiguous (SD3-medium vs SD3.5-medium outside attn2; Qwen-Image shares Flux's diffusers
    # attention names and widths), so those name their family; the others are detected.
    named = family.startswith("sd3") or family in ("qwen_image", "flux1")
    lora = lora_from_tensors(tensors, meta, family=family if named else None)
    assert lora.family == family
    return lora_tensors(lora.modules, family, fmt)


@needs_shapes
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("a", FORMATS)
def test_round_trip_through_every_format(family, a):
    tensors, meta = start(family, a)
    expected = probe_deltas(tensors, meta)
    for b in FORMATS:
        if b == a:
            continue
        mid, mid_meta = convert(tensors, meta, family, b)
        back, back_meta = convert(mid, mid_meta, family, a)
        assert sorted(back) == sorted(tensors), f"{a} -> {b} -> {a} changed the key set"
        for key, value in tensors.items():
            assert back[key].shape == value.shape, key
        assert_same_deltas(expected, probe_deltas(back, back_meta))


@needs_shapes
def test_sd3_kohya_names_and_swapped_last_context_modulation():
    tensors, meta = start("sd3", "diffusers")
    kohya, _ = convert(tensors, meta, "sd3", "kohya")
    # names from formats.md §2.4 (sd-scripts lora_sd3.py)
    for name in ("lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1",
                 "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_x_embedder_proj"):
        assert f"{name}.lora_down.weight" in kohya
    up = kohya["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1.lora_up.weight"]
    theirs = tensors["transformer.transformer_blocks.23.norm1_context.linear.lora_B.weight"]
    assert up.equal(torch.cat([theirs[1536:], theirs[:1536]]))
    qkv = kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"]
    assert qkv.shape == (3 * 1536, 3 * 2)  # three different downs: block-diagonal, rank 3r


@needs_shapes
@pytest.mark.parametrize("family", KOHYA_LISTED)
def test_kohya_and_comfy_are_pure_renames(family):
    # Same factors, same alphas: the tensors themselves must come back bit for bit.
    tensors, _ = start(family, "kohya")
    comfy, meta = convert(tensors, {}, family, "comfy")
    back, _ = convert(comfy, meta, family, "kohya")
    assert all(back[k].dtype == v.dtype and back[k].equal(v) for k, v in tensors.items())
