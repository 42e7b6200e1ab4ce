"""HunyuanVideo 1.0 (issue 16): its table from `hunyuan_video.tsv`, round trips through every format, the
exact split and fuse of its fused qkv, diffusers' converter as oracle, detection against FLUX.1 (whose names
and widths it shares), and a merge into a thinned checkpoint against float64.
"""

from __future__ import annotations

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, lora_from_tensors, lora_tensors
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_round_trips,
    assert_same_deltas,
    diffusers_fixture,
    needs_shapes,
    probe_deltas,
    rows,
    run_script,
)

FORMATS = LORA_FORMATS
H = 3072


def hv_modules() -> dict[str, tuple[int, ...]]:
    return {"transformer." + p: s for p, s in rows("hunyuan_video")}


@needs_shapes
def test_table_follows_the_reference_list():
    table = FAMILIES["hunyuan_video"].table
    listed = dict(rows("hunyuan_video"))
    assert set(table.slots["diffusers"]) == set(listed)
    for path, slot in table.slots["diffusers"].items():
        full = table.shapes[slot.key]
        assert ((slot.rows[1] - slot.rows[0], *full[1:]) if slot.rows else full) == listed[path], path
    native = table.slots["hunyuan"]
    assert {int(p.split(".")[1]) for p in native if p.startswith("double_blocks.")} == set(range(20))
    assert {int(p.split(".")[1]) for p in native if p.startswith("single_blocks.")} == set(range(40))
    assert table.shapes["single_blocks.0.linear1.weight"] == (3 * H + 4 * H, H)
    assert table.shapes["txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"] == (3 * H, H)
    assert table.slots["diffusers"]["norm_out.linear"].swap
    assert not table.slots["diffusers"]["context_embedder.token_refiner.refiner_blocks.0.norm_out.linear"].swap


@needs_shapes
@pytest.mark.parametrize("a", FORMATS)
def test_round_trip_through_every_format(a):
    assert_round_trips("hunyuan_video", hv_modules(), a)


def _native_qkv_lora(rank=6, seed=0) -> dict[str, torch.Tensor]:
    """A musubi-tuner / ComfyUI LoRA on the fused qkv, NOT block-diagonal (every rank direction feeds q, k and v)."""
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": torch.randn(rank, H, generator=g) * 0.1,
            "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": torch.randn(3 * H, rank, generator=g) * 0.1,
            "lora_unet_double_blocks_3_img_attn_qkv.alpha": torch.tensor(3.0),
            "lora_unet_double_blocks_3_img_mlp_fc1.lora_down.weight": torch.randn(rank, H, generator=g) * 0.1,
            "lora_unet_double_blocks_3_img_mlp_fc1.lora_up.weight": torch.randn(4 * H, rank, generator=g) * 0.1}


def test_fused_qkv_splits_exactly_with_a_shared_down():
    src = _native_qkv_lora()
    lora = lora_from_tensors(src, {})
    assert lora.family == "hunyuan_video"
    split, meta = lora_tensors(lora.modules, "hunyuan_video", "diffusers")
    p = "transformer.transformer_blocks.3.attn."
    downs = [split[f"{p}{n}.lora_A.weight"] for n in ("to_q", "to_k", "to_v")]
    # the exact split: one down for the three, the up cut by rows (so q/k/v deltas are the fused delta's rows)
    assert all(d.shape == (6, H) for d in downs) and downs[0].equal(downs[1]) and downs[0].equal(downs[2])
    scale = 3.0 / 6
    full = scale * src["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"].double() @ \
        src["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"].double()
    # ΔW @ X of the three split modules (alpha from the metadata), stacked, is the fused ΔW @ X (same probes X)
    probes = probe_deltas(split, meta)
    x = torch.randn(H, 2, generator=torch.Generator().manual_seed(7 + H), dtype=torch.float64)
    stacked = torch.cat([probes[f"{p}{n}"] for n in ("to_q", "to_k", "to_v")])
    assert float((stacked - full @ x).norm() / (full @ x).norm()) < 1e-6
    # musubi-tuner's reverse split (lora_down cut in three equal parts) loses most of this LoRA
    down = src["lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight"].double()
    up = src["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"].double()
    cut = torch.cat([up[i * H:(i + 1) * H, 2 * i:2 * i + 2] @ down[2 * i:2 * i + 2] for i in range(3)]) * scale
    assert float((cut - full).norm() / full.norm()) > 0.5
    # back to the fused native naming: the same delta
    back, back_meta = lora_tensors(lora_from_tensors(split, meta).modules, "hunyuan_video", "kohya")
    assert_same_deltas(probe_deltas(src), probe_deltas(back, back_meta))


@needs_shapes
def test_diffusers_converter_reads_our_ai_toolkit_file():
    """diffusers' `_convert_hunyuan_video_lora_to_diffusers` (original names, PEFT tensors) gives our deltas,
    the final-layer halves swapped and the refiner's not."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    # diffusers 0.42.1 bug (found here): for the token refiner's fused `self_attn_qkv` its `remap_txt_in_` cuts
    # lora_A into three row chunks like a weight (the Flux/double-block handlers share lora_A), so a fused refiner
    # LoRA fails to load with a shape error; those modules are left out of the comparison.
    modules = {k: s for k, s in hv_modules().items() if ".refiner_blocks." not in k or ".attn.to_" not in k
               or k.endswith("to_out.0")}
    tensors, meta = diffusers_fixture("hunyuan_video", modules=modules)
    lora = lora_from_tensors(tensors, meta)
    ait, _ = lora_tensors(lora.modules, "hunyuan_video", "ai-toolkit")
    assert any(".img_attn_qkv." in k for k in ait) and all(k.startswith("diffusion_model.") for k in ait)
    theirs = conv._convert_hunyuan_video_lora_to_diffusers({k: v.clone() for k, v in ait.items()})
    # second diffusers 0.42.1 bug (found here): its final-layer (shift, scale) -> (scale, shift) swap is applied to
    # lora_A as well as lora_B, so lora_A's rank rows come out swapped: checked as such, then left out.
    ours, ours_meta = lora_tensors(lora.modules, "hunyuan_video", "diffusers")
    a_src = ait["diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"]
    b_src = ait["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"]
    r, half = a_src.shape[0], b_src.shape[0] // 2
    assert theirs["transformer.norm_out.linear.lora_B.weight"].equal(torch.cat([b_src[half:], b_src[:half]]))
    assert theirs["transformer.norm_out.linear.lora_A.weight"].equal(torch.cat([a_src[r // 2:], a_src[:r // 2]]))
    for d in (ours, theirs):
        for k in [k for k in d if k.startswith("transformer.norm_out.linear.")]:
            del d[k]
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-5)


def test_detection_against_flux():
    g = torch.Generator().manual_seed(1)

    def pair(name, o, i):
        return {f"{name}.lora_down.weight": torch.randn(2, i, generator=g),
                f"{name}.lora_up.weight": torch.randn(o, 2, generator=g)}

    shared = {**pair("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H), **pair("lora_unet_single_blocks_0_linear2", H, 5 * H)}
    assert lora_from_tensors(shared, {}).family == "flux1"  # same names and shapes: FLUX.1 unless told
    assert lora_from_tensors(shared, {"ss_base_model_version": "hunyuan_video"}).family == "hunyuan_video"
    own = {**shared, **pair("lora_unet_double_blocks_0_img_mlp_fc1", 4 * H, H)}
    assert lora_from_tensors(own, {}).family == "hunyuan_video"
    deep = {**shared, **pair("lora_unet_single_blocks_39_linear2", H, 5 * H)}  # FLUX.1 has 38 single blocks
    assert lora_from_tensors(deep, {}).family == "hunyuan_video"


def test_merge_into_a_thinned_checkpoint_against_float64(tmp_path):
    g = torch.Generator().manual_seed(3)
    shapes = {"img_in.proj.weight": (H, 16, 1, 2, 2), "vector_in.in_layer.weight": (H, 768),
              "final_layer.linear.weight": (64, H), "final_layer.linear.bias": (64,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_tensors(tmp_path / "hv.safetensors", base)
    lora = {"transformer.x_embedder.proj.lora_A.weight": torch.randn(2, 16, 1, 2, 2, generator=g),
            "transformer.x_embedder.proj.lora_B.weight": torch.randn(H, 2, 1, 1, 1, generator=g),
            "transformer.time_text_embed.text_embedder.linear_1.lora_A.weight": torch.randn(2, 768, generator=g),
            "transformer.time_text_embed.text_embedder.linear_1.lora_B.weight": torch.randn(H, 2, generator=g),
            "transformer.proj_out.lora_A.weight": torch.randn(2, H, generator=g),
            "transformer.proj_out.lora_B.weight": torch.randn(64, 2, generator=g)}
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", str(tmp_path / "hv.safetensors"), "--models", str(tmp_path / "l.safetensors"),
                            "--ratios", "0.6", "--family", "hunyuan_video", "--save_to", str(tmp_path / "o.safetensors")])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    for key, mod in (("img_in.proj.weight", "x_embedder.proj"),
                     ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1"),
                     ("final_layer.linear.weight", "proj_out")):
        a = lora[f"transformer.{mod}.lora_A.weight"].double().flatten(1)
        b = lora[f"transformer.{mod}.lora_B.weight"].double().flatten(1)
        want = base[key].double() + 0.6 * (b @ a).reshape(base[key].shape)
        assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, key
    assert out["final_layer.linear.bias"].equal(base["final_layer.linear.bias"])


def test_hunyuan_lora_into_flux_checkpoint_names_both(tmp_path):
    g = torch.Generator().manual_seed(4)
    save_tensors(tmp_path / "flux.safetensors", {"double_blocks.0.img_mlp.0.weight": torch.randn(4 * H, H, generator=g)})
    save_tensors(tmp_path / "hv.safetensors", _native_qkv_lora())
    with pytest.raises(LoraToolsError, match="for hunyuan_video but the checkpoint is flux1: a HunyuanVideo 1.0 LoRA "
                                             "does not apply to FLUX.1"):
        run_script(merge_lora, ["--sd_model", str(tmp_path / "flux.safetensors"), "--models", str(tmp_path / "hv.safetensors"),
                                "--family", "flux1", "--save_to", str(tmp_path / "o.safetensors")])
    assert not (tmp_path / "o.safetensors").exists()
