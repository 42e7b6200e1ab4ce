"""Qwen-Image 2.1 (issue 16): its table against diffusers' own QwenImage21Transformer2DModel (meta device), ComfyUI's
fused `img_mlp.gate_up` against the two halves LoRAs address (exact both ways), round trips through every format,
2.1 told from Qwen-Image by shapes, diffusers' Qwen converter (its explicit top-level map and un-flattening)
against our flattened names, a tiny 2.1 transformer loading our diffusers output, a merge into a thinned
ComfyUI checkpoint against float64, a Qwen-Image LoRA refused."""

from __future__ import annotations

import re

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, Module, Target, lora_from_tensors, lora_tensors
from library.lora_output import write_lora
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_peft_loaded_and_fused,
    assert_round_trips,
    assert_same_deltas,
    probe_deltas,
    run_script,
)

D, HALF = 4096, 3 * 4096


def qwen21_modules() -> dict[str, tuple[int, ...]]:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.QwenImage21Transformer2DModel()
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def thinned() -> dict[str, tuple[int, ...]]:
    return {"transformer." + p: s for p, s in qwen21_modules().items()
            if not (m := re.match(r"transformer_blocks\.(\d+)\.", p)) or int(m[1]) in (0, 31)}


def test_table_is_diffusers_own_model():
    table = FAMILIES["qwen_image21"].table
    slots = table.slots["diffusers"]
    got = {p: ((s.rows[1] - s.rows[0], *table.shapes[s.key][1:]) if s.rows else table.shapes[s.key]) for p, s in slots.items()}
    assert got == qwen21_modules()
    assert table.shapes["transformer_blocks.31.img_mlp.gate_up.weight"] == (2 * HALF, D)
    assert [(p, s.rows) for p, s in table.by_key["diffusers"]["transformer_blocks.0.img_mlp.gate_up.weight"]] == \
        [("transformer_blocks.0.img_mlp.gate_layer", (0, HALF)), ("transformer_blocks.0.img_mlp.proj", (HALF, 2 * HALF))]
    assert "transformer_blocks.0.img_mlp.gate_up" in table.slots["comfy"]
    assert "transformer_blocks.0.img_mlp.proj" not in table.slots["comfy"]


@pytest.mark.parametrize("a", LORA_FORMATS)
def test_round_trip_through_every_format(a):
    assert_round_trips("qwen_image21", thinned(), a)


def _pair(name: str, out: int, inp: int, g, rank=3) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(rank, inp, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1, f"{name}.alpha": torch.tensor(1.5)}


def test_fused_gate_up_splits_exactly_and_fuses_back():
    g = torch.Generator().manual_seed(0)
    fused = _pair("diffusion_model.transformer_blocks.7.img_mlp.gate_up", 2 * HALF, D, g)
    lora = lora_from_tensors(fused, {})
    assert (lora.family, lora.format) == ("qwen_image21", "comfy")
    halves, meta = lora_tensors(lora.modules, "qwen_image21", "diffusers")
    p = "transformer.transformer_blocks.7.img_mlp."
    down = fused["diffusion_model.transformer_blocks.7.img_mlp.gate_up.lora_down.weight"]
    up = fused["diffusion_model.transformer_blocks.7.img_mlp.gate_up.lora_up.weight"]
    # lora_A shared, lora_B cut by rows: the halves' deltas are the fused delta's rows, bit for bit
    assert halves[p + "gate_layer.lora_A.weight"].equal(down) and halves[p + "proj.lora_A.weight"].equal(down)
    assert halves[p + "gate_layer.lora_B.weight"].equal(up[:HALF]) and halves[p + "proj.lora_B.weight"].equal(up[HALF:])
    back, back_meta = lora_tensors(lora_from_tensors(halves, meta).modules, "qwen_image21", "comfy")
    assert sorted(back) == sorted(fused) and all(back[k].equal(fused[k]) for k in fused)


def test_halves_with_their_own_downs_fuse_block_diagonally():
    """musubi/diffusers halves (independent lora_A each) on ComfyUI's gate_up: stacked downs, block-diagonal up, the
    same delta; read back into halves (same scale), each comes back bit for bit; with other scales, the same deltas."""
    g = torch.Generator().manual_seed(1)
    src = {**_pair("lora_unet_transformer_blocks_4_img_mlp_gate_layer", HALF, D, g),
           **_pair("lora_unet_transformer_blocks_4_img_mlp_proj", HALF, D, g)}
    lora = lora_from_tensors(src, {})
    assert (lora.family, lora.format) == ("qwen_image21", "kohya")
    comfy, comfy_meta = lora_tensors(lora.modules, "qwen_image21", "comfy")
    name = "diffusion_model.transformer_blocks.4.img_mlp.gate_up"
    assert comfy[f"{name}.lora_down.weight"].shape == (6, D) and comfy[f"{name}.lora_up.weight"].shape == (2 * HALF, 6)
    gate, proj = (probe_deltas(src)[f"lora_unet_transformer_blocks_4_img_mlp_{n}"] for n in ("gate_layer", "proj"))
    fused = probe_deltas(comfy, comfy_meta)[name]
    assert float((fused - torch.cat([gate, proj])).norm() / fused.norm()) < 1e-6
    back, back_meta = lora_tensors(lora_from_tensors(comfy, comfy_meta).modules, "qwen_image21", "kohya")
    assert sorted(back) == sorted(src)
    for k in src:
        assert back[k].equal(src[k]) if not k.endswith(".alpha") else float(back[k]) == float(src[k]), k
    src["lora_unet_transformer_blocks_4_img_mlp_proj.alpha"] = torch.tensor(0.75)  # scales 0.5 and 0.25: baked
    comfy, comfy_meta = lora_tensors(lora_from_tensors(src, {}).modules, "qwen_image21", "comfy")
    back, back_meta = lora_tensors(lora_from_tensors(comfy, comfy_meta).modules, "qwen_image21", "kohya")
    assert sorted(back) == sorted(src)
    assert_same_deltas(probe_deltas(src), probe_deltas(back, back_meta))


def test_detects_2_1_against_qwen_image_by_shapes():
    g = torch.Generator().manual_seed(2)
    q20 = {**_pair("lora_unet_transformer_blocks_0_attn_to_q", 3072, 3072, g),
           **_pair("lora_unet_transformer_blocks_0_img_mlp_net_0_proj", 12288, 3072, g)}
    q21 = {**_pair("lora_unet_transformer_blocks_0_attn_to_q", D, D, g),
           **_pair("lora_unet_transformer_blocks_0_img_mlp_proj", HALF, D, g)}
    assert lora_from_tensors(q20, {}).family == "qwen_image"
    assert lora_from_tensors(q21, {}).family == "qwen_image21"
    # attention alone at 4096 wide is 2.1's only (Qwen-Image and FLUX.1 are 3072 wide)
    assert lora_from_tensors(_pair("lora_unet_transformer_blocks_0_attn_to_q", D, D, g), {}).family == "qwen_image21"
    assert lora_from_tensors(_pair("transformer.modulation.1", 4 * D, D, g), {}).family == "qwen_image21"


def _flat_file(family: str) -> dict[str, torch.Tensor]:
    """A kohya file naming every diffusers module of `family` (1x1 factors: the converter only renames)."""
    out = {}
    for path in FAMILIES[family].table.slots["diffusers"]:
        flat = "lora_unet_" + path.replace(".", "_")
        out[flat + ".lora_down.weight"], out[flat + ".lora_up.weight"] = torch.ones(1, 1), torch.ones(1, 1)
    return out


def test_diffusers_qwen_converter_agrees_on_qwen_image_and_mangles_2_1():
    """diffusers' explicit top-level map (img_in, txt_in, proj_out, norm_out.linear, time_text_embed…) plus its
    protected-n-gram un-flattening give, for every Qwen-Image module, the dotted name our table gives. On 2.1's
    kohya names (musubi's lora_qwen_image_21) it fails: `img_mlp_gate_layer` becomes `img_mlp.gate.layer`, and
    `txt_in_in_layer`, `txt_in_out_layer`, `modulation_1` (absent from its top-level map) break the conversion;
    we read all of them by matching against the table."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    theirs = conv._convert_non_diffusers_qwen_lora_to_diffusers(_flat_file("qwen_image"))
    assert {k[len("transformer."):-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")} == \
        set(FAMILIES["qwen_image"].table.slots["diffusers"])
    gate = {k: v for k, v in _flat_file("qwen_image21").items() if "blocks_0_img_mlp_gate_layer" in k}
    assert set(conv._convert_non_diffusers_qwen_lora_to_diffusers(dict(gate))) == \
        {"transformer.transformer_blocks.0.img_mlp.gate.layer.lora_A.weight",
         "transformer.transformer_blocks.0.img_mlp.gate.layer.lora_B.weight"}
    for top in ("txt_in_in_layer", "txt_in_out_layer", "modulation_1"):
        one = {k: v for k, v in _flat_file("qwen_image21").items() if k.startswith(f"lora_unet_{top}.")}
        with pytest.raises(ValueError):
            conv._convert_non_diffusers_qwen_lora_to_diffusers(one)
    g = torch.Generator().manual_seed(3)
    ours = lora_from_tensors({**_pair("lora_unet_txt_in_in_layer", D, D, g), **_pair("lora_unet_modulation_1", 4 * D, D, g),
                              **_pair("lora_unet_transformer_blocks_2_img_mlp_gate_layer", HALF, D, g)}, {})
    assert ours.family == "qwen_image21" and sorted(m.target.describe() for m in ours.modules) == \
        ["modulation.1.weight", "transformer_blocks.2.img_mlp.gate_up.weight[0:12288]", "txt_in.in_layer.weight"]


def test_merge_into_a_thinned_comfy_checkpoint_against_float64(tmp_path):
    """Halves LoRAs (diffusers format, each its own lora_A) merged into ComfyUI's fused gate_up (float16 storage):
    each half lands on its rows; checked against float64 on sampled rows, to float16 rounding."""
    g = torch.Generator().manual_seed(4)
    key = "transformer_blocks.5.img_mlp.gate_up.weight"
    base = {key: (torch.randn(2 * HALF, D, generator=g) * 0.02).half(), "proj_out.weight": torch.randn(64, D, generator=g)}
    save_tensors(tmp_path / "q21.safetensors", base)
    lora = {}
    for mod, rows in (("transformer_blocks.5.img_mlp.gate_layer", HALF), ("transformer_blocks.5.img_mlp.proj", HALF),
                      ("proj_out", 64)):
        lora[f"transformer.{mod}.lora_A.weight"] = torch.randn(2, D, generator=g) * 0.1
        lora[f"transformer.{mod}.lora_B.weight"] = torch.randn(rows, 2, generator=g) * 0.1
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "q21.safetensors", "--models", tmp_path / "l.safetensors",
                            "--ratios", "0.8", "--family", "qwen_image21", "--save_to", tmp_path / "o.safetensors"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    assert out[key].dtype == torch.float16
    sample = torch.cat([torch.arange(0, 40), torch.arange(HALF - 20, HALF + 20), torch.arange(2 * HALF - 40, 2 * HALF)])
    for mod, offset in (("gate_layer", 0), ("proj", HALF)):
        rows = sample[(sample >= offset) & (sample < offset + HALF)]
        a = lora[f"transformer.transformer_blocks.5.img_mlp.{mod}.lora_A.weight"].double()
        b = lora[f"transformer.transformer_blocks.5.img_mlp.{mod}.lora_B.weight"].double()
        want = base[key][rows].double() + 0.8 * b[rows - offset] @ a
        err = (out[key][rows].double() - want).abs()
        assert bool((err <= 2.0 ** -10 * want.abs() + 1e-7).all()), mod  # float16's half-ulp of each value
    want = base["proj_out.weight"].double() + 0.8 * lora["transformer.proj_out.lora_B.weight"].double() @ \
        lora["transformer.proj_out.lora_A.weight"].double()
    assert float((out["proj_out.weight"].double() - want).norm() / want.norm()) < 1e-6


def test_qwen_image_lora_into_2_1_checkpoint_names_both(tmp_path):
    g = torch.Generator().manual_seed(5)
    save_tensors(tmp_path / "q21.safetensors", {"proj_out.weight": torch.randn(64, D, generator=g)})
    save_tensors(tmp_path / "q20.safetensors", _pair("transformer.transformer_blocks.0.img_mlp.net.0.proj", 12288, 3072, g))
    with pytest.raises(LoraToolsError, match="for qwen_image but the checkpoint is qwen_image21: a Qwen-Image LoRA does "
                                             "not apply to Qwen-Image 2.1"):
        run_script(merge_lora, ["--sd_model", tmp_path / "q21.safetensors", "--models", tmp_path / "q20.safetensors",
                                "--family", "qwen_image21", "--save_to", tmp_path / "o.safetensors"])
    assert not (tmp_path / "o.safetensors").exists()


def test_tiny_qwen21_transformer_loads_our_diffusers_output(tmp_path):
    """Our diffusers file (the gate_up halves under their diffusers names) loads into a Qwen-Image 2.1 transformer of
    tiny widths through diffusers' `load_lora_into_transformer`, every key used; fused, weights are base + delta."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(6)
    model = diffusers.QwenImage21Transformer2DModel(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                                    num_attention_heads=2, context_in_dim=12, axes_dims_rope=(2, 2, 4))
    slots = FAMILIES["qwen_image21"].table.slots["diffusers"]
    gen = torch.Generator().manual_seed(7)
    mods = []
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            assert name in slots, name
            o, n = module.weight.shape
            t = {"lora_down.weight": torch.randn(2, n, generator=gen) * 0.1,
                 "lora_up.weight": torch.randn(o, 2, generator=gen) * 0.1, "alpha": torch.tensor((1.0, 2.0, 0.5)[i % 3])}
            mods.append(Module(Target(slots[name].key, slots[name].rows, "transformer", (o, n)), t, name))
    assert any(m.source.endswith("img_mlp.gate_layer") for m in mods)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), mods, "qwen_image21", "diffusers", dtype=torch.float32, script="test", args=None, inputs=[])
    pipe = diffusers.QwenImage21Pipeline
    state, metadata = pipe.lora_state_dict(str(tmp_path), weight_name=path.name, return_lora_metadata=True)
    pipe.load_lora_into_transformer(state, transformer=model, adapter_name="t", metadata=metadata)
    assert_peft_loaded_and_fused(model, state, mods, base)
