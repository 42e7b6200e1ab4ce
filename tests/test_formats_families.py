"""Family facts live in library.formats: write specs come from the per-format modules and the family's data,
metadata and block weights read the family's values."""

from __future__ import annotations

import pytest

from library.block_weights import FAMILY_LAYOUTS, LAYOUT_FAMILIES, PRESETS, parse_block_weights
from library.formats import FAMILIES
from library.formats.family import Family, MetadataFacts, TextEncoder, WriteSpec
from library.metadata import lora_metadata


def toy(ai_toolkit: str) -> Family:
    te = TextEncoder("clip_x", "clip_x", "lora_te1_", "text_encoder", "text_encoders.clip_x.transformer.")
    return Family(name="toy", description="a family made of data only", namings={"transformer": ("nat", "diffusers")},
                  read_prefixes=(("", "transformer"),), block_id=lambda key: None, native="nat", kohya_naming="nat",
                  ai_toolkit=ai_toolkit, text_encoders={"te1": te})


def test_a_new_family_gets_every_format_from_its_data():
    fam = toy("peft-diffusers")
    assert fam.write == {
        "kohya": {"transformer": WriteSpec("lora_unet_", "nat", flat=True),
                  "te1": WriteSpec("lora_te1_", "clip_x", flat=True)},
        "diffusers": {"transformer": WriteSpec("transformer.", "diffusers", peft=True, alpha="metadata",
                                               adapter_name="transformer"),
                      "te1": WriteSpec("text_encoder.", "clip_x", peft=True, alpha="metadata", adapter_name="text_encoder")},
        "ai-toolkit": {"transformer": WriteSpec("transformer.", "diffusers", peft=True, alpha="bake"),
                       "te1": WriteSpec("text_encoder.", "clip_x", peft=True, alpha="bake")},
        "comfy": {"transformer": WriteSpec("diffusion_model.", "nat"),
                  "te1": WriteSpec("text_encoders.clip_x.transformer.", "clip_x")},
    }
    assert toy("peft-native").write["ai-toolkit"] == {"transformer": WriteSpec("diffusion_model.", "nat", peft=True,
                                                                              alpha="bake")}
    assert toy("kohya-diffusers").write["ai-toolkit"]["transformer"] == WriteSpec("lora_unet_", "diffusers", flat=True)
    with pytest.raises(ValueError, match="unknown AI-Toolkit style"):
        _ = toy("other").write


def test_sd_families_keep_sd_scripts_names():
    # SD1/SD2 kohya files use diffusers module names, SDXL the SGM ones (sd-scripts); UNet under `unet.` in PEFT.
    assert FAMILIES["sd1"].write["kohya"]["unet"] == WriteSpec("lora_unet_", "diffusers", flat=True)
    assert FAMILIES["sdxl"].write["kohya"]["unet"] == WriteSpec("lora_unet_", "ldm", flat=True)
    assert FAMILIES["sdxl"].write["kohya"]["te2"] == WriteSpec("lora_te2_", "clip_g", flat=True)
    assert FAMILIES["sd2"].write["comfy"]["te1"] == WriteSpec("text_encoders.clip_h.transformer.", "clip_h")
    assert FAMILIES["flux1"].write["diffusers"]["t5"] == WriteSpec("text_encoder_2.", "t5", peft=True, alpha="metadata",
                                                                    adapter_name="text_encoder_2")


@pytest.mark.parametrize(("family", "arch", "version", "v2", "module"), [
    ("sd1", "stable-diffusion-v1/lora", "sd_v1", "False", "networks.lora"),
    ("sd2", "stable-diffusion-v2-512/lora", "sd_v2", "True", "networks.lora"),
    ("sdxl", "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0", "False", "networks.lora"),
    ("flux1", "flux-1-dev/lora", "flux1", None, "networks.lora_flux"),
    ("sd3", "stable-diffusion-3-medium/lora", "sd3", None, "networks.lora"),
    ("qwen_image", "qwen-image/lora", None, None, "networks.lora"),
])
def test_lora_metadata_takes_the_family_facts(family, arch, version, v2, module):
    meta = lora_metadata({}, family=family, ranks=[4], alphas=[4], save_to="x.safetensors")
    assert meta["modelspec.architecture"] == arch
    assert meta.get("ss_base_model_version") == version
    assert meta.get("ss_v2") == v2
    assert meta["ss_network_module"] == module
    facts = FAMILIES[family].metadata
    assert isinstance(facts, MetadataFacts) and meta.get("modelspec.resolution") == facts.resolution


def test_block_weight_tables_are_gathered_from_the_families():
    # Chroma and FLUX.1 Fill have FLUX.1's 19 double and 38 single blocks, so the webui's Flux layout
    assert LAYOUT_FAMILIES == {17: ("sd1", "sd2"), 26: ("sd1", "sd2"), 12: ("sdxl",), 20: ("sdxl",),
                               61: ("flux1", "chroma", "flux1_fill")}
    assert FAMILY_LAYOUTS == {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20), "flux1": (61,), "chroma": (61,),
                              "flux1_fill": (61,)}
    assert set(PRESETS) == {*FAMILIES["sd1"].block_weights.presets, "FLUXALL"} and PRESETS["FLUXALL"] == ",".join(["1"] * 61)
    # a 12-value SDXL string is spread over SDXL's own 20 blocks
    bw = parse_block_weights(",".join(["1"] * 12))
    assert list(bw.values) == list(FAMILIES["sdxl"].block_weights.layouts[20])
    assert bw.values["IN04"] == 1.0 and bw.values["IN01"] == 0.0
