"""Block weights: webui layouts, block boundaries pinned for every SD1.x / SDXL weight, presets, Flux form."""

import re

import pytest

from library.block_weights import (
    LAYOUTS,
    PRESETS,
    block_weights_for_models,
    load_presets,
    parse_block_weights,
    webui_block,
)
from library.errors import LoraToolsError
from library.formats import FAMILIES

# --- independent block assignment, from diffusers module paths (not from LDM names) -------------------


def expected_block(path: str) -> str | None:
    """Webui block of a diffusers UNet module: LDM input block 3i+j+1 for down level i, layer j, etc."""
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path)
    if m:
        return f"IN{3 * int(m[1]) + int(m[3]) + 1:02d}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.", path)
    if m:
        return f"IN{3 * int(m[1]) + 3:02d}"
    if path.startswith("mid_block."):
        return "M00"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path)
    if m:
        return f"OUT{3 * int(m[1]) + int(m[3]):02d}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.", path)
    if m:
        return f"OUT{3 * int(m[1]) + 2:02d}"
    if path.startswith("conv_in"):
        return "IN00"
    assert path.startswith(("time_embedding.", "add_embedding.", "conv_out", "conv_norm_out")), path
    return None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_unet_weight_lands_in_its_webui_block(family):
    table = FAMILIES[family].table
    seen = set()
    for path, slot in table.slots["diffusers"].items():
        assert webui_block(family, slot.key) == expected_block(path), (path, slot.key)
        seen.add(expected_block(path))
    n_in = 9 if family == "sdxl" else 12
    assert seen - {None} == {f"IN{i:02d}" for i in range(n_in)} | {"M00"} | {f"OUT{i:02d}" for i in range(n_in)}
    for key, component in table.components.items():
        if component != "unet":
            assert webui_block(family, key) == "BASE", key


def test_pinned_examples_where_comfy_ports_are_off_by_one():
    sd1 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # down_blocks.0.attentions.0
    assert webui_block("sd1", sd1) == "IN01"
    assert webui_block("sd1", "model.diffusion_model.input_blocks.0.0.weight") == "IN00"  # conv_in
    assert webui_block("sd1", "model.diffusion_model.input_blocks.11.0.out_layers.3.weight") == "IN11"
    assert webui_block("sd1", "model.diffusion_model.output_blocks.2.1.conv.weight") == "OUT02"  # SD1 upsampler 0
    assert webui_block("sd1", "model.diffusion_model.time_embed.0.weight") is None
    xl = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"  # down_blocks.1.attentions.0
    assert webui_block("sdxl", xl) == "IN04"
    assert webui_block("sdxl", "model.diffusion_model.input_blocks.7.1.proj_in.weight") == "IN07"
    assert webui_block("sdxl", "model.diffusion_model.output_blocks.8.0.skip_connection.weight") == "OUT08"
    assert webui_block("sdxl", "model.diffusion_model.label_emb.0.0.weight") is None
    assert webui_block("sdxl", "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight") == "BASE"


def test_layouts_are_the_webui_ones():
    assert LAYOUTS[17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                           "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert LAYOUTS[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                           "OUT05")
    assert len(LAYOUTS[26]) == 26 and len(LAYOUTS[20]) == 20 and len(LAYOUTS[61]) == 61
    assert LAYOUTS[61][:4] == ("CLIP", "T5", "IN", "D00") and LAYOUTS[61][22] == "S00" and LAYOUTS[61][-1] == "OUT"


def test_sdxl_12_values_reach_in04_and_in07():
    values = [0.1 * i for i in range(12)]
    bw = parse_block_weights(",".join(f"{v:.1f}" for v in values))
    key = "model.diffusion_model.{}.1.transformer_blocks.0.attn1.to_q.weight"
    assert bw.weight("sdxl", key.format("input_blocks.4")) == pytest.approx(0.1)
    assert bw.weight("sdxl", key.format("input_blocks.5")) == pytest.approx(0.2)
    assert bw.weight("sdxl", key.format("input_blocks.7")) == pytest.approx(0.3)
    assert bw.weight("sdxl", key.format("input_blocks.8")) == pytest.approx(0.4)
    assert bw.weight("sdxl", key.format("middle_block")) == pytest.approx(0.5)
    assert bw.weight("sdxl", key.format("output_blocks.0")) == pytest.approx(0.6)
    assert bw.weight("sdxl", key.format("output_blocks.5")) == pytest.approx(1.1)
    # blocks the 12-list does not name are 0 (webui), weights outside every block keep 1
    assert bw.weight("sdxl", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight") == 0.0
    assert bw.weight("sdxl", key.format("output_blocks.6")) == 0.0
    assert bw.weight("sdxl", "model.diffusion_model.time_embed.2.weight") == 1.0
    assert bw.weight("sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == 0.0


def test_sd1_17_values():
    values = [round(0.05 * (i + 1), 2) for i in range(17)]
    bw = parse_block_weights(",".join(map(str, values)))
    for i, name in enumerate(LAYOUTS[17]):
        assert bw.values[name] == values[i]
    assert bw.weight("sd1", "model.diffusion_model.input_blocks.1.1.proj_in.weight") == values[1]
    assert bw.weight("sd1", "model.diffusion_model.input_blocks.3.0.op.weight") == 0.0  # IN03 is not in the 17
    assert bw.weight("sd1", "model.diffusion_model.middle_block.1.proj_out.weight") == values[7]
    assert bw.weight("sd1", "model.diffusion_model.output_blocks.11.1.proj_out.weight") == values[16]
    assert bw.weight("sd1", "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.q_proj.weight") == values[0]
    assert bw.weight("sd1", "model.diffusion_model.out.2.weight") == 1.0


def test_flux_61():
    values = [i / 100 for i in range(61)]
    bw = parse_block_weights(json_list(values))
    assert bw.weight("flux1", "double_blocks.5.img_attn.qkv.weight") == values[3 + 5]
    assert bw.weight("flux1", "single_blocks.37.linear2.weight") == values[3 + 19 + 37]
    assert bw.weight("flux1", "single_blocks.0.linear1.weight") == values[22]
    assert bw.weight("flux1", "img_in.weight") == values[2]
    assert bw.weight("flux1", "guidance_in.out_layer.weight") == values[2]
    assert bw.weight("flux1", "final_layer.adaLN_modulation.1.weight") == values[60]
    assert bw.weight("flux1", "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == values[0]
    assert bw.weight("flux1", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight") == values[1]
    table = FAMILIES["flux1"].table
    assert all(webui_block("flux1", k) is not None for k in table.shapes), "every Flux weight has a webui block"


def json_list(values):
    return "[" + ", ".join(str(v) for v in values) + "]"


def test_presets_and_family_checks():
    ins = parse_block_weights("INS")
    assert [ins.values[n] for n in LAYOUTS[17]] == [float(v) for v in PRESETS["INS"].split(",")]
    assert ins.weight("sd1", "model.diffusion_model.input_blocks.4.1.proj_in.weight") == 1.0
    assert ins.weight("sd1", "model.diffusion_model.input_blocks.5.1.proj_in.weight") == 0.0
    with pytest.raises(LoraToolsError, match="this LoRA is sdxl, which expects 12 or 20"):
        ins.weight("sdxl", "model.diffusion_model.input_blocks.4.1.proj_in.weight")
    with pytest.raises(LoraToolsError, match="17 values"):
        parse_block_weights("1," * 16 + "1").check_family("flux1")
    half = parse_block_weights("ALL0.5")  # constant presets mean the same thing for any family
    assert half.weight("flux1", "double_blocks.0.img_attn.qkv.weight") == 0.5
    assert half.weight("sdxl", "model.diffusion_model.time_embed.0.weight") == 0.5
    assert parse_block_weights("NONE").weight("sd1", "model.diffusion_model.out.2.weight") == 0.0
    assert parse_block_weights("FLUXALL").weight("flux1", "img_in.weight") == 1.0


def test_bad_strings():
    with pytest.raises(LoraToolsError, match="have 5 values"):
        parse_block_weights("1,1,1,1,1")
    with pytest.raises(LoraToolsError, match="'abc' is not a number"):
        parse_block_weights(",".join(["1"] * 11 + ["abc"]))
    with pytest.raises(LoraToolsError, match="invalid JSON"):
        parse_block_weights("[1, 2,")
    with pytest.raises(LoraToolsError, match="has 1 entries but 2 models"):
        block_weights_for_models(["ALL"], 2)


def test_random_and_x_values():
    text = ",".join(["R", "U", "X", "X+0.25", "X-1"] + ["1"] * 7)
    a = parse_block_weights(text, seed=7, x=0.5)
    b = parse_block_weights(text, seed=7, x=0.5)
    c = parse_block_weights(text, seed=8, x=0.5)
    assert a.values == b.values and a.values != c.values
    assert 0.0 <= a.values["BASE"] <= 1.0 and round(a.values["BASE"], 3) == a.values["BASE"]
    assert -0.5 <= a.values["IN04"] <= 1.5
    assert (a.values["IN05"], a.values["IN07"], a.values["IN08"]) == (0.5, 0.75, -0.5)
    one, two = block_weights_for_models([text, text], 2, seed=3)
    assert one.values["BASE"] != two.values["BASE"]  # each model draws its own values


def test_user_presets_toml_and_txt(tmp_path):
    toml_file = tmp_path / "lbw.toml"
    toml_file.write_text('[presets]\nMINE = "0,1,1,1,1,0,0,0,0,0,0,0"\nINS = [1,0,0,0,0,0,0,0,0,0,0,0]\n')
    mine, ins = block_weights_for_models(["MINE", "INS"], 2, presets_file=str(toml_file))
    assert mine.text == "MINE" and mine.values["IN04"] == 1.0 and mine.values["BASE"] == 0.0
    assert ins.length == 12 and ins.values["BASE"] == 1.0  # a user preset shadows the built-in one
    txt = tmp_path / "lbwpresets.txt"
    txt.write_text("# comment\nHALF:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5\n")
    assert load_presets(str(txt)) == {"HALF": ",".join(["0.5"] * 12)}
    (none,) = block_weights_for_models(["-"], 1)
    assert none is None
    with pytest.raises(LoraToolsError, match="cannot read"):
        load_presets(str(tmp_path / "missing.toml"))
