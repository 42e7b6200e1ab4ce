"""Fused ↔ split layers, written out by hand: Flux qkv/linear1, the final-layer scale/shift swap, xlabs,
LyCORIS on fused layers, and the AI-Toolkit Flux file that sd-scripts' flux_merge_lora.py cannot read."""

from __future__ import annotations

import torch

from library.formats import lora_from_tensors, lora_tensors
from networks import adapter_from_tensors
from tests.helpers import ai_toolkit_single_block

H, R = 3072, 2
gen = torch.Generator().manual_seed(3)


def rnd(*shape):
    return torch.randn(*shape, generator=gen)


_PROBES: dict[int, torch.Tensor] = {}


def dense(down, up, scale=1.0):
    """(scale·up@down) @ X for a fixed random X per input width: rows compare like ΔW rows, at a fraction
    of the cost of building a 21504×3072 float64 matrix."""
    n = down.shape[1]
    if n not in _PROBES:
        _PROBES[n] = torch.randn(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return scale * (up.double() @ (down.double() @ _PROBES[n]))


def test_ai_toolkit_flux_to_kohya_fuses_linear1_block_diagonally():
    # The exact key style of sd-scripts' KeyError: transformer.single_transformer_blocks.N.attn.to_k.lora_A.weight
    t = ai_toolkit_single_block(7)
    lora = lora_from_tensors(t)
    assert (lora.family, lora.format) == ("flux1", "diffusers")
    out, meta = lora_tensors(lora.modules, "flux1", "kohya")
    name = "lora_unet_single_blocks_7_linear1"
    assert sorted(out) == [f"{name}.alpha", f"{name}.lora_down.weight", f"{name}.lora_up.weight"]
    assert out[f"{name}.lora_down.weight"].shape == (4 * R, H)
    assert float(out[f"{name}.alpha"]) == 4 * R  # scale 1 kept: AI-Toolkit files have alpha = rank
    want = torch.cat([dense(t[f"transformer.single_transformer_blocks.7.{p}.lora_A.weight"],
                            t[f"transformer.single_transformer_blocks.7.{p}.lora_B.weight"])
                      for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    got = dense(out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"])
    assert torch.allclose(got, want, rtol=0, atol=1e-9)
    # and back: the block-diagonal up is recognised, so each part gets its own rank-R factors again
    back, _ = lora_tensors(lora_from_tensors(out).modules, "flux1", "ai-toolkit")
    assert sorted(back) == sorted(t) and all(back[k].equal(v) for k, v in t.items())


def test_partial_coverage_leaves_the_other_rows_unchanged():
    t = ai_toolkit_single_block(0, parts=("attn.to_q", "attn.to_v"))
    out, _ = lora_tensors(lora_from_tensors(t).modules, "flux1", "kohya")
    up = out["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (7 * H, 2 * R)
    assert not up[H:2 * H].any() and not up[3 * H:].any()
    got = dense(out["lora_unet_single_blocks_0_linear1.lora_down.weight"], up)
    v = dense(t["transformer.single_transformer_blocks.0.attn.to_v.lora_A.weight"],
              t["transformer.single_transformer_blocks.0.attn.to_v.lora_B.weight"])
    assert torch.allclose(got[2 * H:3 * H], v, rtol=0, atol=1e-9)


def test_kohya_qkv_splits_with_a_shared_down_and_keeps_alpha():
    down, up = rnd(R, H), rnd(3 * H, R)
    t = {"lora_unet_double_blocks_3_txt_attn_qkv.lora_down.weight": down,
         "lora_unet_double_blocks_3_txt_attn_qkv.lora_up.weight": up,
         "lora_unet_double_blocks_3_txt_attn_qkv.alpha": torch.tensor(1.0)}
    out, meta = lora_tensors(lora_from_tensors(t).modules, "flux1", "diffusers")
    for i, p in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        key = f"transformer.transformer_blocks.3.attn.{p}"
        assert out[f"{key}.lora_A.weight"].equal(down)
        assert out[f"{key}.lora_B.weight"].equal(up[i * H:(i + 1) * H])
    assert '"transformer.lora_alpha": 1.0' in meta["lora_adapter_metadata"]
    back, _ = lora_tensors(lora_from_tensors(out, meta).modules, "flux1", "kohya")
    assert sorted(back) == sorted(t) and all(back[k].equal(v) for k, v in t.items())  # identical downs -> rank R


def test_block_diagonal_kohya_qkv_splits_at_the_small_rank():
    # What sd-scripts writes from a split LoRA: rank 3R, up block diagonal; alpha 3 for scale 1/(2R)... per part.
    downs = [rnd(R, H) for _ in range(3)]
    ups = [rnd(H, R) for _ in range(3)]
    up = torch.block_diag(*ups)
    t = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(downs),
         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
         "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0)}
    out, meta = lora_tensors(lora_from_tensors(t).modules, "flux1", "diffusers")
    lora = lora_from_tensors(out, meta)
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        assert out[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"].equal(downs[i])
        module = next(m for m in lora.modules if m.source.endswith(f"attn.{p}"))
        scale = adapter_from_tensors(module.tensors).scale
        assert abs(scale - 3.0 / (3 * R)) < 1e-12  # the fused scale α/3R, kept per part


def test_final_layer_swaps_only_the_up_halves():
    down, up = rnd(R, H), rnd(2 * H, R)
    t = {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
         "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up,
         "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(float(R))}
    out, meta = lora_tensors(lora_from_tensors(t).modules, "flux1", "diffusers")
    assert out["transformer.norm_out.linear.lora_A.weight"].equal(down)
    assert out["transformer.norm_out.linear.lora_B.weight"].equal(torch.cat([up[H:], up[:H]]))
    # norm_out.linear alone also fits Qwen-Image; our own output records its family in the metadata
    assert meta["loratools.family"] == "flux1"
    back, _ = lora_tensors(lora_from_tensors(out, meta).modules, "flux1", "comfy")
    assert back["diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight"].equal(up)


def test_xlabs_single_block_qkv_pads_linear1():
    down, up = rnd(R, H), rnd(3 * H, R)
    pdown, pup = rnd(R, 5 * H), rnd(H, R)
    t = {"single_blocks.2.processor.qkv_lora.down.weight": down, "single_blocks.2.processor.qkv_lora.up.weight": up,
         "single_blocks.2.processor.proj_lora.down.weight": pdown, "single_blocks.2.processor.proj_lora.up.weight": pup}
    lora = lora_from_tensors(t)
    assert (lora.family, lora.format) == ("flux1", "xlabs")
    out, _ = lora_tensors(lora.modules, "flux1", "kohya")
    kup = out["lora_unet_single_blocks_2_linear1.lora_up.weight"]
    assert kup.shape == (7 * H, R) and kup[:3 * H].equal(up) and not kup[3 * H:].any()
    assert out["lora_unet_single_blocks_2_linear1.lora_down.weight"].equal(down)
    assert out["lora_unet_single_blocks_2_linear2.lora_down.weight"].equal(pdown)
    peft, _ = lora_tensors(lora.modules, "flux1", "diffusers")
    assert "transformer.single_transformer_blocks.2.proj_mlp.lora_A.weight" not in peft  # nothing there


def test_loha_on_a_fused_layer_becomes_an_exact_split_lora_in_peft_formats():
    t = {"lora_unet_double_blocks_1_img_attn_qkv.hada_w1_a": rnd(3 * H, R),
         "lora_unet_double_blocks_1_img_attn_qkv.hada_w1_b": rnd(R, H),
         "lora_unet_double_blocks_1_img_attn_qkv.hada_w2_a": rnd(3 * H, R),
         "lora_unet_double_blocks_1_img_attn_qkv.hada_w2_b": rnd(R, H),
         "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(1.0)}
    n = "lora_unet_double_blocks_1_img_attn_qkv."
    probe = torch.randn(H, 3, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    w1 = t[n + "hada_w1_a"].double() @ t[n + "hada_w1_b"].double()
    w2 = t[n + "hada_w2_a"].double() @ t[n + "hada_w2_b"].double()
    expected = (w1 * w2 * (1.0 / R)) @ probe  # ΔW = (α/r)·(w1_a w1_b) ⊙ (w2_a w2_b), written out
    lora = lora_from_tensors(t)
    for fmt in ("diffusers", "ai-toolkit"):
        out, meta = lora_tensors(lora.modules, "flux1", fmt)
        assert not any(".hada_" in k for k in out)  # no LyCORIS keys under PEFT names
        split = lora_from_tensors(out, meta)
        assert len(split.modules) == 3
        for m in split.modules:
            s, e = m.target.rows
            a = adapter_from_tensors(m.tensors)
            assert a.kind == "lora" and a.rank == R * R
            got = a.scale * (a.up.double().reshape(e - s, -1) @ (a.down.double() @ probe))
            assert torch.allclose(got, expected[s:e], rtol=0, atol=1e-9), fmt
    # kohya and comfy hold LoHa modules: unchanged, bit for bit
    back, _ = lora_tensors(lora.modules, "flux1", "kohya")
    assert sorted(back) == sorted(t) and all(back[k].equal(v) for k, v in t.items())


def test_lokr_in_peft_formats_is_an_exact_lora_or_refused():
    import pytest

    from library.errors import LoraToolsError

    n = "lora_unet_double_blocks_1_img_attn_qkv."
    # Full factors: the exact LoRA form has rank 4·768 = 3072 on a 9216×3072 weight, no smaller than the weight.
    full = {n + "lokr_w1": rnd(6, 4), n + "lokr_w2": rnd(3 * H // 6, H // 4), n + "alpha": torch.tensor(1.0)}
    lora = lora_from_tensors(full)
    for fmt in ("diffusers", "ai-toolkit"):
        with pytest.raises(LoraToolsError, match=r"has no LoKr.*rank 3072.*formats that hold LoKr modules: kohya, comfy"):
            lora_tensors(lora.modules, "flux1", fmt)
    back, _ = lora_tensors(lora.modules, "flux1", "kohya")
    assert sorted(back) == sorted(full) and all(back[k].equal(v) for k, v in full.items())
    # Decomposed w2 of rank 2 with a 4×4 w1: an exact LoRA of rank 4·2 = 8, split over to_q/to_k/to_v.
    low = {n + "lokr_w1": rnd(4, 4), n + "lokr_w2_a": rnd(3 * H // 4, 2), n + "lokr_w2_b": rnd(2, H // 4),
           n + "alpha": torch.tensor(1.0)}
    w2 = low[n + "lokr_w2_a"].double() @ low[n + "lokr_w2_b"].double()
    probe = torch.randn(H, 3, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    expected = torch.kron(low[n + "lokr_w1"].double(), w2) * (1.0 / 2) @ probe  # scale α / rank(w2)
    out, meta = lora_tensors(lora_from_tensors(low).modules, "flux1", "diffusers")
    assert not any(".lokr_" in k for k in out)
    for p in ("to_q", "to_k", "to_v"):
        assert out[f"transformer.transformer_blocks.1.attn.{p}.lora_A.weight"].shape == (8, H)
    for m in lora_from_tensors(out, meta).modules:
        s, e = m.target.rows
        a = adapter_from_tensors(m.tensors)
        got = a.scale * (a.up.double() @ (a.down.double() @ probe))
        assert torch.allclose(got, expected[s:e], rtol=0, atol=1e-9)


def test_split_parts_with_different_scales_fuse_exactly():
    a = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rnd(R, H),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rnd(H, R),
         "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(1.0),
         "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": rnd(2 * R, H),
         "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": rnd(H, 2 * R),
         "transformer.transformer_blocks.0.attn.to_k.alpha": torch.tensor(8.0)}
    # attention-only diffusers names and widths are shared by Flux.1 and Qwen-Image: name the family
    out, _ = lora_tensors(lora_from_tensors(a, family="flux1").modules, "flux1", "kohya")
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    got = dense(out[f"{n}.lora_down.weight"], out[f"{n}.lora_up.weight"], float(out[f"{n}.alpha"]) / (3 * R))
    p = "transformer.transformer_blocks.0.attn."
    q = dense(a[p + "to_q.lora_A.weight"], a[p + "to_q.lora_B.weight"], 1.0 / R)
    k = dense(a[p + "to_k.lora_A.weight"], a[p + "to_k.lora_B.weight"], 8.0 / (2 * R))
    assert torch.allclose(got[:H], q, rtol=1e-6, atol=1e-6) and torch.allclose(got[H:2 * H], k, rtol=1e-6, atol=1e-6)
    assert not got[2 * H:].any()
