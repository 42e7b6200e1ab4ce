"""HunyuanVideo 1.5 (issue 16): its table against diffusers' own HunyuanVideo15Transformer3DModel (meta device), the
four namings (Comfy-Org's fused checkpoint, musubi/official split q/k/v, ComfyUI's renamed model, diffusers), the
exact fused <-> split conversion both ways (never musubi's equal cut of lora_down), diffusers' HunyuanVideo 1.0
converter as oracle on the blocks 1.5 shares with it, a tiny 1.5 transformer taking our diffusers output, a merge
into a thinned official checkpoint against float64, and a 1.0 LoRA refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, Module, Target, lora_from_tensors, lora_tensors
from library.formats.hunyuan_video15 import comfy_path
from library.lora_output import write_lora
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_peft_loaded_and_fused,
    assert_round_trips,
    assert_same_deltas,
    diffusers_fixture,
    probe_deltas,
    run_script,
)

H = 2048
CONFIG_480P = {"in_channels": 65, "out_channels": 32, "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54,
               "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1, "qk_norm": "rms_norm",
               "text_embed_dim": 3584, "text_embed_2_dim": 1472, "image_embed_dim": 1152, "rope_theta": 256.0,
               "rope_axes_dim": (16, 56, 56), "use_meanflow": False}


def hv15_modules() -> dict[str, tuple[int, ...]]:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.HunyuanVideo15Transformer3DModel(**CONFIG_480P)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))}


def thinned() -> dict[str, tuple[int, ...]]:
    return {"transformer." + p: s for p, s in hv15_modules().items()
            if not (m := re.match(r"transformer_blocks\.(\d+)\.", p)) or int(m[1]) in (0, 53)}


def test_table_is_diffusers_own_model_and_the_four_namings():
    table = FAMILIES["hunyuan_video15"].table
    slots = table.slots["diffusers"]
    got = {p: ((s.rows[1] - s.rows[0], *table.shapes[s.key][1:]) if s.rows else table.shapes[s.key]) for p, s in slots.items()}
    assert got == hv15_modules()
    assert table.shapes["double_blocks.53.img_attn_qkv.weight"] == (3 * H, H)
    assert table.shapes["double_blocks.0.img_mod.linear.weight"] == (6 * H, H)
    assert not any(k.startswith("single_blocks.") for k in table.shapes)
    assert [(p, s.rows) for p, s in table.by_key["musubi"]["double_blocks.7.txt_attn_qkv.weight"]] == \
        [("double_blocks.7.txt_attn_q", (0, H)), ("double_blocks.7.txt_attn_k", (H, 2 * H)),
         ("double_blocks.7.txt_attn_v", (2 * H, 3 * H))]
    # musubi's convert_hunyuan_video_1_5_lora_to_comfy.py renames (sd-scripts <-> ComfyUI), flattened
    flat = {n: table.flat[n] for n in ("musubi", "comfy")}
    for musubi, comfy in (("img_mlp_fc1", "img_mlp_0"), ("img_mlp_fc2", "img_mlp_2"), ("img_mod_linear", "img_mod_lin"),
                          ("txt_mlp_fc1", "txt_mlp_0"), ("txt_mlp_fc2", "txt_mlp_2"), ("txt_mod_linear", "txt_mod_lin")):
        a = table.slots["musubi"][flat["musubi"][f"double_blocks_5_{musubi}"]].key
        assert a == table.slots["comfy"][flat["comfy"][f"double_blocks_5_{comfy}"]].key
    assert comfy_path("txt_in.individual_token_refiner.blocks.1.self_attn_qkv") == \
        "txt_in.individual_token_refiner.blocks.1.self_attn.qkv"
    assert comfy_path("time_in.mlp.0") == "time_in.in_layer" and comfy_path("txt_in.c_embedder.linear_2") == \
        "txt_in.c_embedder.out_layer"
    assert table.slots["diffusers"]["norm_out.linear"].swap
    assert table.slots["diffusers"]["context_embedder_2.linear_3"].key == "byt5_in.fc3.weight"


@pytest.mark.parametrize("a", LORA_FORMATS)
def test_round_trip_through_every_format(a):
    assert_round_trips("hunyuan_video15", thinned(), a)


def _pair(name, out, inp, g, rank=4, alpha=2.0):
    return {f"{name}.lora_down.weight": torch.randn(rank, inp, generator=g) * 0.1,
            f"{name}.lora_up.weight": torch.randn(out, rank, generator=g) * 0.1, f"{name}.alpha": torch.tensor(alpha)}


def test_fused_qkv_to_musubi_split_is_exact_and_the_equal_cut_is_not():
    """A ComfyUI-side fused qkv LoRA, not block-diagonal: musubi's names get the shared down and the up cut by rows
    (exact); musubi's own reverse converter (lora_down cut in three) would lose most of it."""
    g = torch.Generator().manual_seed(0)
    src = _pair("diffusion_model.double_blocks.3.img_attn_qkv", 3 * H, H, g, rank=6, alpha=3.0)
    lora = lora_from_tensors(src, {})
    assert (lora.family, lora.format) == ("hunyuan_video15", "comfy")
    musubi, meta = lora_tensors(lora.modules, "hunyuan_video15", "kohya")
    names = [f"lora_unet_double_blocks_3_img_attn_{p}" for p in ("q", "k", "v")]
    down = src["diffusion_model.double_blocks.3.img_attn_qkv.lora_down.weight"]
    up = src["diffusion_model.double_blocks.3.img_attn_qkv.lora_up.weight"]
    for i, n in enumerate(names):
        assert musubi[f"{n}.lora_down.weight"].equal(down)
        assert musubi[f"{n}.lora_up.weight"].equal(up[i * H:(i + 1) * H]) and float(musubi[f"{n}.alpha"]) == 3.0
    full = 0.5 * up.double() @ down.double()
    cut = torch.cat([up[i * H:(i + 1) * H, 2 * i:2 * i + 2].double() @ down[2 * i:2 * i + 2].double() for i in range(3)]) * 0.5
    assert float((cut - full).norm() / full.norm()) > 0.5
    back, back_meta = lora_tensors(lora_from_tensors(musubi, meta).modules, "hunyuan_video15", "comfy")
    assert sorted(back) == sorted(src) and all(back[k].equal(src[k]) for k in src)


def test_musubi_split_to_fused_is_block_diagonal_and_exact():
    g = torch.Generator().manual_seed(1)
    src = {}
    for p in ("q", "k", "v"):
        src.update(_pair(f"lora_unet_double_blocks_9_txt_attn_{p}", H, H, g))
    src.update(_pair("lora_unet_double_blocks_9_txt_mlp_fc1", 4 * H, H, g))
    lora = lora_from_tensors(src, {})
    assert (lora.family, lora.format) == ("hunyuan_video15", "kohya")
    fused, meta = lora_tensors(lora.modules, "hunyuan_video15", "comfy")
    name = "diffusion_model.double_blocks.9.txt_attn_qkv"
    # what musubi's forward converter writes too: downs stacked (rank 3r), up block-diagonal, alpha 3·alpha
    assert fused[f"{name}.lora_down.weight"].shape == (12, H) and float(fused[f"{name}.alpha"]) == 6.0
    up = fused[f"{name}.lora_up.weight"]
    assert up[:H, 4:].abs().sum() == 0 and up[H:2 * H, :4].abs().sum() == 0 and up[H:2 * H, 8:].abs().sum() == 0
    probes = probe_deltas(src)
    stacked = torch.cat([probes[f"lora_unet_double_blocks_9_txt_attn_{p}"] for p in ("q", "k", "v")])
    got = probe_deltas(fused, meta)[name]
    assert float((got - stacked).norm() / stacked.norm()) < 1e-6
    back, back_meta = lora_tensors(lora_from_tensors(fused, meta).modules, "hunyuan_video15", "kohya")
    assert sorted(back) == sorted(src) and all(back[k].equal(src[k]) for k in src)


def test_reads_musubis_comfy_conversion():
    """musubi's converter output: sd-scripts flattening over ComfyUI's model names (img_mlp_0, img_mod_lin, qkv)."""
    g = torch.Generator().manual_seed(2)
    src = {**_pair("lora_unet_double_blocks_2_img_mlp_0", 4 * H, H, g),
           **_pair("lora_unet_double_blocks_2_img_mod_lin", 6 * H, H, g),
           **_pair("lora_unet_double_blocks_2_img_attn_qkv", 3 * H, H, g),
           **_pair("lora_unet_double_blocks_2_txt_mlp_2", H, 4 * H, g)}
    lora = lora_from_tensors(src, {})
    assert lora.family == "hunyuan_video15"
    assert sorted(m.target.describe() for m in lora.modules) == [
        "double_blocks.2.img_attn_qkv.weight", "double_blocks.2.img_mlp.fc1.weight", "double_blocks.2.img_mod.linear.weight",
        "double_blocks.2.txt_mlp.fc2.weight"]


def test_diffusers_hunyuan_converter_on_the_shared_blocks():
    """diffusers 0.42.1 has no 1.5 LoRA converter; its 1.0 converter (`_convert_hunyuan_video_lora_to_diffusers`) knows
    the double-block names 1.5 keeps, so on those it is an oracle for our fused -> diffusers split."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    modules = {k: s for k, s in thinned().items() if k.startswith("transformer.transformer_blocks.")}
    tensors, meta = diffusers_fixture("hunyuan_video15", modules=modules)
    lora = lora_from_tensors(tensors, meta)
    ait, _ = lora_tensors(lora.modules, "hunyuan_video15", "ai-toolkit")
    assert any(".img_attn_qkv." in k for k in ait)
    theirs = conv._convert_hunyuan_video_lora_to_diffusers({k: v.clone() for k, v in ait.items()})
    ours, ours_meta = lora_tensors(lora.modules, "hunyuan_video15", "diffusers")
    assert sorted(theirs) == sorted(ours)
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-5)


def test_tiny_hv15_transformer_loads_our_diffusers_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    torch.manual_seed(6)
    model = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, text_embed_dim=12, text_embed_2_dim=10, image_embed_dim=6, rope_axes_dim=(2, 2, 4))
    slots = FAMILIES["hunyuan_video15"].table.slots["diffusers"]
    gen = torch.Generator().manual_seed(7)
    mods = []
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            assert name in slots, name
            o, n = module.weight.shape
            slot = slots[name]
            t = {"lora_down.weight": torch.randn(2, n, generator=gen) * 0.1,
                 "lora_up.weight": torch.randn(o, 2, generator=gen) * 0.1, "alpha": torch.tensor((1.0, 2.0, 0.5)[i % 3])}
            # a target per diffusers module at the tiny width; rows name its slice of the fused weight
            mods.append(Module(Target(slot.key, slot.rows, "transformer", (o, n)), t, name))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), mods, "hunyuan_video15", "diffusers", dtype=torch.float32, script="test", args=None, inputs=[])
    state, meta = load_tensors(path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = json.loads(meta["lora_adapter_metadata"])
    model.load_lora_adapter(state, prefix="transformer", adapter_name="t", metadata=config)
    def canonical_to_diffusers(m, delta):
        if m.source == "norm_out.linear":  # given in the canonical (shift, scale) order; diffusers' is swapped
            half = delta.shape[0] // 2
            return torch.cat([delta[half:], delta[:half]])
        return delta

    assert_peft_loaded_and_fused(model, state, mods, base, reorder=canonical_to_diffusers)


def test_merge_into_a_thinned_official_checkpoint_against_float64(tmp_path):
    """A fused-qkv (ComfyUI side) LoRA merged into Tencent's official checkpoint, which stores q, k, v apart."""
    g = torch.Generator().manual_seed(3)
    shapes = {f"double_blocks.4.img_attn_{p}.weight": (H, H) for p in ("q", "k", "v")}
    shapes.update({"double_blocks.4.img_mlp.fc1.weight": (4 * H, H), "byt5_in.fc1.weight": (H, 1472),
                   "final_layer.linear.bias": (32,)})
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_tensors(tmp_path / "hv15.safetensors", base)
    lora = {**_pair("diffusion_model.double_blocks.4.img_attn_qkv", 3 * H, H, g),
            **_pair("diffusion_model.double_blocks.4.img_mlp.fc1", 4 * H, H, g),
            **_pair("diffusion_model.byt5_in.fc1", H, 1472, g)}
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "hv15.safetensors", "--models", tmp_path / "l.safetensors",
                            "--ratios", "0.6", "--family", "hunyuan_video15", "--save_to", tmp_path / "o.safetensors"])
    out, _ = load_tensors(tmp_path / "o.safetensors")

    def delta(mod):
        up, down = (lora[f"diffusion_model.{mod}.lora_{s}.weight"].double() for s in ("up", "down"))
        return 0.5 * up @ down

    qkv = delta("double_blocks.4.img_attn_qkv")
    wants = {f"double_blocks.4.img_attn_{p}.weight": qkv[i * H:(i + 1) * H] for i, p in enumerate(("q", "k", "v"))}
    wants["double_blocks.4.img_mlp.fc1.weight"] = delta("double_blocks.4.img_mlp.fc1")
    wants["byt5_in.fc1.weight"] = delta("byt5_in.fc1")
    for key, d in wants.items():
        want = base[key].double() + 0.6 * d
        assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, key
    assert out["final_layer.linear.bias"].equal(base["final_layer.linear.bias"])


def test_hunyuan_video_1_0_lora_into_1_5_checkpoint_names_both(tmp_path):
    g = torch.Generator().manual_seed(4)
    save_tensors(tmp_path / "hv15.safetensors", {"double_blocks.0.img_attn_qkv.weight": torch.randn(3 * H, H, generator=g)})
    save_tensors(tmp_path / "hv10.safetensors", _pair("lora_unet_double_blocks_0_img_mlp_fc1", 4 * 3072, 3072, g))
    with pytest.raises(LoraToolsError, match="for hunyuan_video but the checkpoint is hunyuan_video15: a HunyuanVideo 1.0 "
                                             "LoRA does not apply to HunyuanVideo 1.5"):
        run_script(merge_lora, ["--sd_model", tmp_path / "hv15.safetensors", "--models", tmp_path / "hv10.safetensors",
                                "--family", "hunyuan_video15", "--save_to", tmp_path / "o.safetensors"])
    assert not (tmp_path / "o.safetensors").exists()
