"""merge_lora.py into a checkpoint: W + Σ ratio·scale·up@down against float64 written out here, on small
checkpoints with real key names and real shapes for the weights the LoRAs touch (SD1.5, SDXL with both
text encoders); untouched tensors byte-identical; LoHa and DoRA formulas; block weights; bad input."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_lora
from library.errors import LoraToolsError
from tests.helpers import run_script

SD1_UNET = "model.diffusion_model."
TE1 = "cond_stage_model.transformer.text_model.encoder.layers."
XL_TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
XL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."


def run(*argv):
    return run_script(merge_lora, argv)


def lora_pair(g, out, inp, rank, conv=None):
    """(down, up) of a kohya LoRA/LoCon module."""
    if conv:
        return torch.randn(rank, inp, *conv, generator=g), torch.randn(out, rank, 1, 1, generator=g)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def delta64(down, up, alpha, shape):
    """(alpha/rank)·up@down in float64, conv flattened and reshaped — the formula, written out."""
    rank = down.shape[0]
    d = up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)
    return (alpha / rank) * d.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# SD1.5 fixture: real keys and shapes for the touched weights, plus untouched tensors of several kinds


SD1_TARGETS = {  # kohya module -> (checkpoint key, shape)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        (SD1_UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (320, 320)),
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k":
        (SD1_UNET + "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", (640, 768)),
    "lora_unet_up_blocks_3_attentions_2_proj_out":
        (SD1_UNET + "output_blocks.11.1.proj_out.weight", (320, 320, 1, 1)),
    "lora_unet_down_blocks_0_resnets_0_conv1":
        (SD1_UNET + "input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (TE1 + "0.self_attn.q_proj.weight", (768, 768)),
    "lora_te_text_model_encoder_layers_11_mlp_fc1": (TE1 + "11.mlp.fc1.weight", (3072, 768)),
}


def sd1_checkpoint(path, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {key: (torch.randn(*shape, generator=g) * 0.05).to(dtype) for key, shape in SD1_TARGETS.values()}
    tensors[SD1_UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"] = torch.randn(320, generator=g).to(dtype)
    tensors[SD1_UNET + "time_embed.0.weight"] = torch.randn(1280, 320, generator=g).to(dtype)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(512, 4, 3, 3, generator=g).to(dtype)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    save_file(tensors, str(path), metadata={"note": "base", "modelspec.title": "tiny"})
    return tensors


def sd1_lora(path, seed=1, alpha=4.0, rank=8, modules=None):
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, (key, shape) in SD1_TARGETS.items():
        if modules is not None and name not in modules:
            continue
        conv = shape[2:] if len(shape) == 4 else None
        down, up = lora_pair(g, shape[0], shape[1], rank, conv)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        factors[key] = (down, up, alpha)
    save_file(tensors, str(path))
    return factors


def test_sd1_two_loras_negative_ratio_against_float64(tmp_path):
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    fa = sd1_lora(tmp_path / "a.safetensors", seed=1, alpha=4.0, rank=8)
    fb = sd1_lora(tmp_path / "b.safetensors", seed=2, alpha=1.0, rank=4,
                  modules=["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                           "lora_te_text_model_encoder_layers_11_mlp_fc1"])
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
        "--ratios", 0.7, -1.3, "--save_to", out, "--family", "sd1")
    merged = load_file(str(out))
    assert set(merged) == set(base)
    for key, shape in SD1_TARGETS.values():
        expected = base[key].double() + 0.7 * delta64(*fa[key], shape)
        if key in fb:
            expected += -1.3 * delta64(*fb[key], shape)
        assert merged[key].dtype == torch.float32
        assert torch.allclose(merged[key].double(), expected, rtol=0, atol=2e-5), key
    for key in set(base) - {k for k, _ in SD1_TARGETS.values()}:  # untouched: same dtype, same bits
        assert merged[key].dtype == base[key].dtype
        assert torch.equal(merged[key].view(torch.uint8) if merged[key].dim() else merged[key],
                           base[key].view(torch.uint8) if base[key].dim() else base[key]), key
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "base" and meta["loratools.script"] == "merge_lora.py"
    assert json.loads(meta["loratools.inputs"]).keys() == {"a.safetensors", "b.safetensors"}


def test_fp16_checkpoint_rounds_once(tmp_path):
    base = sd1_checkpoint(tmp_path / "base.safetensors", dtype=torch.float16)
    fa = sd1_lora(tmp_path / "a.safetensors", modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", 0.5,
        "--save_to", out, "--family", "sd1")
    key, shape = SD1_TARGETS["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    merged = load_file(str(out))[key]
    expected = (base[key].double() + 0.5 * delta64(*fa[key], shape)).half()
    assert merged.dtype == torch.float16
    # fp32 maths then one cast: at most one fp16 ulp from the float64 result rounded once
    # (a float64 value next to a rounding midpoint may land on either side after the fp32 sum)
    size = torch.maximum(merged.double().abs(), expected.double().abs())
    ulp = torch.finfo(torch.float16).eps * size + 2 ** -24
    assert ((merged.double() - expected.double()).abs() <= ulp).all()
    assert (merged != expected).float().mean() < 0.01


def test_save_precision_casts_untouched_and_keeps_ints(tmp_path):
    sd1_checkpoint(tmp_path / "base.safetensors")
    sd1_lora(tmp_path / "a.safetensors", modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
        "--family", "sd1", "--save_precision", "bf16", "--no_metadata")
    merged = load_file(str(out))
    assert merged[SD1_UNET + "time_embed.0.weight"].dtype == torch.bfloat16
    assert merged["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    with safe_open(str(out), "pt") as f:
        assert not f.metadata()


def test_block_weights_into_checkpoint(tmp_path):
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    fa = sd1_lora(tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    # 17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11
    lbw = "0.25,0.5,1,1,-2,1,1,1,1,1,1,1,1,1,1,1,0"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", 0.8,
        "--lbws", lbw, "--save_to", out, "--family", "sd1")
    merged = load_file(str(out))
    block = {"input_blocks.1.1": 0.5, "input_blocks.5.1": -2.0, "output_blocks.11.1": 0.0, "input_blocks.1.0": 0.5,
             "layers.0.": 0.25, "layers.11.": 0.25}
    for key, shape in SD1_TARGETS.values():
        w = next(v for k, v in block.items() if k in key)
        expected = base[key].double() + 0.8 * w * delta64(*fa[key], shape)
        assert torch.allclose(merged[key].double(), expected, atol=2e-5), key


def test_loha_and_dora_modules(tmp_path):
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(5)
    key_q, (out_q, in_q) = SD1_TARGETS["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    key_k, (out_k, in_k) = SD1_TARGETS["lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"]
    r = 4
    w1a, w1b = torch.randn(out_q, r, generator=g), torch.randn(r, in_q, generator=g)
    w2a, w2b = torch.randn(out_q, r, generator=g), torch.randn(r, in_q, generator=g)
    down, up = torch.randn(r, in_k, generator=g), torch.randn(out_k, r, generator=g) * 0.1
    mag = torch.rand(out_k, 1, generator=g) + 0.5
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    un = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{te}.hada_w1_a": w1a, f"{te}.hada_w1_b": w1b, f"{te}.hada_w2_a": w2a, f"{te}.hada_w2_b": w2b,
               f"{te}.alpha": torch.tensor(2.0),
               f"{un}.lora_down.weight": down, f"{un}.lora_up.weight": up, f"{un}.alpha": torch.tensor(2.0),
               f"{un}.dora_scale": mag}, str(tmp_path / "lyco.safetensors"))
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "lyco.safetensors", "--ratios", 0.6,
        "--save_to", out, "--family", "sd1")
    merged = load_file(str(out))
    loha = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * (2.0 / r)
    assert torch.allclose(merged[key_q].double(), base[key_q].double() + 0.6 * loha, atol=1e-4)
    w = base[key_k].double()
    updated = w + (2.0 / r) * up.double() @ down.double()
    dora = mag.double() * updated / updated.norm(dim=1, keepdim=True)  # magnitude per output row
    assert torch.allclose(merged[key_k].double(), w + 0.6 * (dora - w), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# SDXL: UNet (SGM names) + TE1 (CLIP-L) + TE2 (OpenCLIP-G, q/k/v fused in in_proj_weight)


def test_sdxl_both_text_encoders_fused_in_proj(tmp_path):
    g = torch.Generator().manual_seed(3)
    unet_key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"
    base = {
        unet_key: torch.randn(640, 640, generator=g) * 0.02,
        XL_TE1 + "3.self_attn.v_proj.weight": torch.randn(768, 768, generator=g) * 0.02,
        XL_TE2 + "7.attn.in_proj_weight": torch.randn(3 * 1280, 1280, generator=g) * 0.02,
        XL_TE2 + "7.attn.in_proj_bias": torch.randn(3 * 1280, generator=g),
        XL_TE2 + "7.attn.out_proj.weight": torch.randn(1280, 1280, generator=g) * 0.02,
        "conditioner.embedders.1.model.positional_embedding": torch.randn(77, 1280, generator=g),
    }
    save_file(base, str(tmp_path / "xl.safetensors"))
    lora, rank = {}, 4
    mods = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
            "lora_te1_text_model_encoder_layers_3_self_attn_v_proj": (768, 768),
            "lora_te2_text_model_encoder_layers_7_self_attn_k_proj": (1280, 1280),
            "lora_te2_text_model_encoder_layers_7_self_attn_v_proj": (1280, 1280)}
    f = {}
    for name, (o, i) in mods.items():
        down, up = lora_pair(g, o, i, rank)
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)})
        f[name] = (down, up, 1.0)
    save_file(lora, str(tmp_path / "xl_lora.safetensors"))
    out = tmp_path / "out.safetensors"
    result = run("--sd_model", tmp_path / "xl.safetensors", "--models", tmp_path / "xl_lora.safetensors",
                 "--ratios", 1.5, "--save_to", out, "--family", "sdxl", "--sdxl")
    merged = load_file(str(out))
    assert torch.allclose(merged[unet_key].double(), base[unet_key].double() + 1.5 * delta64(
        *f["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"], (640, 640)), atol=2e-5)
    k = XL_TE1 + "3.self_attn.v_proj.weight"
    assert torch.allclose(merged[k].double(), base[k].double() + 1.5 * delta64(
        *f["lora_te1_text_model_encoder_layers_3_self_attn_v_proj"], (768, 768)), atol=2e-5)
    fused = XL_TE2 + "7.attn.in_proj_weight"
    expected = base[fused].double().clone()
    expected[1280:2560] += 1.5 * delta64(*f["lora_te2_text_model_encoder_layers_7_self_attn_k_proj"], (1280, 1280))
    expected[2560:] += 1.5 * delta64(*f["lora_te2_text_model_encoder_layers_7_self_attn_v_proj"], (1280, 1280))
    assert torch.equal(merged[fused][:1280], base[fused][:1280])  # q rows untouched
    assert torch.allclose(merged[fused].double(), expected, atol=2e-5)
    assert torch.equal(merged[XL_TE2 + "7.attn.in_proj_bias"], base[XL_TE2 + "7.attn.in_proj_bias"])
    assert len(result["result"].changed) == 3


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors, no output file


def test_sdxl_lora_into_sd1_checkpoint_is_refused(tmp_path):
    sd1_checkpoint(tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = lora_pair(g, 1280, 1280, 4)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(640, 4)},
              str(tmp_path / "xl.safetensors"))
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraToolsError, match="this LoRA is for sdxl but the checkpoint is sd1"):
        run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "xl.safetensors", "--save_to", out,
            "--family", "sd1")
    assert not out.exists() and os.listdir(tmp_path) == sorted(os.listdir(tmp_path))  # nothing new besides inputs
    assert {p.name for p in tmp_path.iterdir()} == {"base.safetensors", "xl.safetensors"}


def test_unmatched_modules_listed_or_skipped(tmp_path):
    tensors = sd1_checkpoint(tmp_path / "base.safetensors")
    missing = SD1_TARGETS["lora_unet_down_blocks_0_resnets_0_conv1"][0]
    del tensors[missing]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    sd1_lora(tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraToolsError, match=r"1 LoRA module\(s\) match no weight.*down_blocks_0_resnets_0_conv1"):
        run("--sd_model", tmp_path / "partial.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
            "--family", "sd1")
    assert not out.exists()
    run("--sd_model", tmp_path / "partial.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
        "--family", "sd1", "--allow_unmatched")
    assert out.exists()


def test_ratio_count_and_dry_run(tmp_path, capsys):
    sd1_checkpoint(tmp_path / "base.safetensors")
    sd1_lora(tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraToolsError, match="--ratios has 2 values but 1 models"):
        run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", 1, 2,
            "--save_to", out)
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
        "--family", "sd1", "--dry_run")
    text = capsys.readouterr().out
    assert "6 modules matched (te1 2, unet 4)" in text and "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in text
    assert not out.exists()
    with pytest.raises(LoraToolsError, match="--sdxl contradicts --family sd1"):
        run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
            "--family", "sd1", "--sdxl")


def test_fp8_checkpoint_reports_lost_delta(tmp_path, capsys):
    key, shape = SD1_TARGETS["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    g = torch.Generator().manual_seed(9)
    weight = (torch.randn(*shape, generator=g) * 0.05).to(torch.float8_e4m3fn)
    save_file({key: weight}, str(tmp_path / "fp8.safetensors"))
    fa = sd1_lora(tmp_path / "a.safetensors", modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    out = tmp_path / "out.safetensors"
    result = run("--sd_model", tmp_path / "fp8.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", 1e-4,
                 "--save_to", out, "--family", "sd1")
    merged = load_file(str(out))[key]
    intended = 1e-4 * delta64(*fa[key], shape)
    expected = (weight.double() + intended).float().to(torch.float8_e4m3fn)  # sum wide, one cast
    assert merged.dtype == torch.float8_e4m3fn and torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))
    (stats,) = result["result"].changed
    lost = float((merged.double() - weight.double() - intended).norm() / intended.norm())
    assert stats.relative_error == pytest.approx(lost, rel=1e-3) and lost > 0.5
    assert "lost over 5% of their delta to the storage precision" in capsys.readouterr().err


def test_copy_fallback_without_copy_file_range(tmp_path, monkeypatch):
    """Untouched tensors stay bit-identical when the kernel copy is unavailable (old kernels, other filesystems)."""
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    sd1_lora(tmp_path / "a.safetensors", modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])

    def refuse(*_args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "out.safetensors"
    result = run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
                 "--family", "sd1")
    merged = load_file(str(out))
    assert result["result"].copied == len(base) - 1
    for key in base:
        if key != SD1_TARGETS["lora_te_text_model_encoder_layers_0_self_attn_q_proj"][0] and base[key].dim():
            assert torch.equal(merged[key].view(torch.uint8), base[key].view(torch.uint8)), key


def test_flux_diffusers_layout_split_qkv_and_swapped_final_layer(tmp_path):
    """A kohya Flux LoRA (fused BFL qkv, BFL final modulation) into a diffusers-layout transformer: the qkv
    rows land in to_q/to_k/to_v, and the (shift, scale) halves land swapped in norm_out.linear."""
    g = torch.Generator().manual_seed(21)
    h = 3072
    base = {f"transformer_blocks.0.attn.to_{p}.weight": (torch.randn(h, h, generator=g) * 0.02).bfloat16()
            for p in "qkv"}
    base["norm_out.linear.weight"] = (torch.randn(2 * h, h, generator=g) * 0.02).bfloat16()
    base["norm_out.linear.bias"] = torch.randn(2 * h, generator=g).bfloat16()
    save_file(base, str(tmp_path / "flux_diffusers.safetensors"))
    qkv, final = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_final_layer_adaLN_modulation_1"
    lora = {}
    for name, rows in ((qkv, 3 * h), (final, 2 * h)):
        lora[f"{name}.lora_down.weight"] = torch.randn(2, h, generator=g) / 10
        lora[f"{name}.lora_up.weight"] = torch.randn(rows, 2, generator=g) / 10
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(lora, str(tmp_path / "flux_lora.safetensors"), metadata={"ss_base_model_version": "flux1"})
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "flux_diffusers.safetensors", "--models", tmp_path / "flux_lora.safetensors",
        "--ratios", 0.9, "--save_to", out, "--family", "flux1")
    merged = load_file(str(out))
    cols = 64

    def d(name):  # BFL-order delta, first `cols` columns, float64
        return 0.9 * 0.5 * lora[f"{name}.lora_up.weight"].double() @ lora[f"{name}.lora_down.weight"].double()[:, :cols]

    def check(key, expected):
        got = merged[key][:, :cols].double()
        want = base[key][:, :cols].double() + expected
        # one bf16 rounding of the sum, plus float32 noise on the delta (visible where W + ΔW nearly cancels)
        tol = 2 ** -8 * want.abs() + 2 ** -22 * base[key][:, :cols].double().abs()
        assert ((got - want).abs() <= tol).all(), key

    fused = d(qkv)
    for i, p in enumerate("qkv"):
        check(f"transformer_blocks.0.attn.to_{p}.weight", fused[i * h:(i + 1) * h])
    bfl = d(final)  # BFL rows: shift then scale; diffusers rows: scale then shift
    check("norm_out.linear.weight", torch.cat([bfl[h:], bfl[:h]]))
    assert torch.equal(merged["norm_out.linear.bias"], base["norm_out.linear.bias"])


def test_pickled_ckpt_input_gives_the_same_result(tmp_path):
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    torch.save({"state_dict": base, "global_step": 10}, str(tmp_path / "base.ckpt"))
    sd1_lora(tmp_path / "a.safetensors")
    outs = []
    for name in ("base.safetensors", "base.ckpt"):
        out = tmp_path / f"from_{name}.safetensors"
        run("--sd_model", tmp_path / name, "--models", tmp_path / "a.safetensors", "--ratios", 0.6, "--save_to", out,
            "--family", "sd1", "--no_metadata")
        outs.append(load_file(str(out)))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_order_of_iteration_does_not_change_the_result(tmp_path, monkeypatch):
    """Read-ahead follows file order; a progress wrapper yielding keys in another order must not make a
    changed tensor look untouched (it would then be copied unmerged)."""
    base = sd1_checkpoint(tmp_path / "base.safetensors")
    fa = sd1_lora(tmp_path / "a.safetensors")
    monkeypatch.setattr(merge_lora, "progress", lambda keys, **_: list(reversed(list(keys))))
    out = tmp_path / "out.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--save_to", out,
        "--family", "sd1")
    merged = load_file(str(out))
    for key, shape in SD1_TARGETS.values():
        assert torch.allclose(merged[key].double(), base[key].double() + delta64(*fa[key], shape), atol=2e-5), key


def test_sharded_checkpoint_streams_through_the_reader_without_mmap(tmp_path, monkeypatch):
    """A checkpoint split in shards gives the same bytes as the single file, and no tensor is read through
    safetensors' mmap (`get`): changed tensors come from the reader's own `read`, untouched ones are copied."""
    from library.safetensors_io import LazyReader

    base = sd1_checkpoint(tmp_path / "base.safetensors")
    sd1_lora(tmp_path / "a.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(base)
    halves = {"m-00001-of-00002.safetensors": keys[: len(keys) // 2], "m-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in halves.items():
        save_file({k: base[k] for k in names}, str(folder / shard))
    weight_map = {k: shard for shard, names in halves.items() for k in names}
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = tmp_path / "single.safetensors"
    run("--sd_model", tmp_path / "base.safetensors", "--models", tmp_path / "a.safetensors", "--ratios", 0.6,
        "--save_to", single, "--family", "sd1", "--no_metadata")

    plain_get = LazyReader.get

    def no_mmap(self, key):
        if os.path.dirname(self.path) == str(folder):  # the LoRA itself is small: read as usual
            raise AssertionError(f"{key} read through the mmap")
        return plain_get(self, key)

    monkeypatch.setattr(LazyReader, "get", no_mmap)
    sharded = tmp_path / "from_shards.safetensors"
    run("--sd_model", folder, "--models", tmp_path / "a.safetensors", "--ratios", 0.6, "--save_to", sharded,
        "--family", "sd1", "--no_metadata")
    monkeypatch.undo()
    want, got = load_file(str(single)), load_file(str(sharded))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key].view(torch.uint8) if want[key].dim() else want[key],
                           got[key].view(torch.uint8) if got[key].dim() else got[key]), key
