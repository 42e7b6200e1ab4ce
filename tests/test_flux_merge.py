"""flux_merge_lora.py: Flux LoRAs of any trainer into a Flux checkpoint or into one LoRA.

Fixtures use real BFL / diffusers key names and real widths (the format tables check shapes), but only
a handful of weights and rank 16, so each file is a few hundred MB at most in bf16. References are
float64 `W + Σ ratio·scale·up@down` written out here, from the raw tensors of the files.
"""

from __future__ import annotations

import os

import pytest
import torch

import flux_merge_lora
from library.errors import LoraToolsError
from library.formats import read_lora
from library.lora_output import output_dtype
from library.lora_output import write_lora as write_through_writer
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import SHARED_DATA

H = 3072
R = 16
BFL_SHAPES = {  # canonical key -> shape
    "double_blocks.0.img_attn.qkv.weight": (3 * H, H),
    "double_blocks.0.img_attn.qkv.bias": (3 * H,),
    "double_blocks.0.img_attn.proj.weight": (H, H),
    "double_blocks.0.txt_attn.proj.weight": (H, H),
    "single_blocks.0.linear1.weight": (3 * H + 4 * H, H),
    "final_layer.adaLN_modulation.1.weight": (2 * H, H),
    "final_layer.linear.weight": (64, H),
    "img_in.weight": (H, 64),
    "time_in.in_layer.weight": (H, 256),
    "guidance_in.in_layer.weight": (H, 256),
}
# Small weights no LoRA here changes: with them a file holding only the weights a test changes still has the
# four Flux transformer weights a partial checkpoint needs (flux_merge.flux_layout), and they show that what
# no LoRA touches is copied bit for bit, at ~3 MB instead of a 38–264 MB block weight each.
UNTOUCHED = ["final_layer.linear.weight", "img_in.weight", "time_in.in_layer.weight", "guidance_in.in_layer.weight"]
# diffusers transformer names of the same weights (fused ones split; norm_out halves swapped).
DIFFUSERS_OF = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0), ("transformer_blocks.0.attn.to_k", H),
                                     ("transformer_blocks.0.attn.to_v", 2 * H)],
    "double_blocks.0.img_attn.proj": [("transformer_blocks.0.attn.to_out.0", 0)],
    "double_blocks.0.txt_attn.proj": [("transformer_blocks.0.attn.to_add_out", 0)],
    "single_blocks.0.linear1": [("single_transformer_blocks.0.attn.to_q", 0), ("single_transformer_blocks.0.attn.to_k", H),
                                ("single_transformer_blocks.0.attn.to_v", 2 * H),
                                ("single_transformer_blocks.0.proj_mlp", 3 * H)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 0)],
    "final_layer.linear": [("proj_out", 0)],
    "img_in": [("x_embedder", 0)],
    "time_in.in_layer": [("time_text_embed.timestep_embedder.linear_1", 0)],
    "guidance_in.in_layer": [("time_text_embed.guidance_embedder.linear_1", 0)],
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bfl_checkpoint(path, dtype=torch.bfloat16, seed=0, keys=None, scale=0.05) -> dict[str, torch.Tensor]:
    """BFL weights at full width (`keys` only, when given), saved to `path` unless it is None (a test that
    only converts them to another layout need not write this file too)."""
    g = _gen(seed)
    tensors = {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in BFL_SHAPES.items()
               if keys is None or k in keys}
    if path is not None:
        save_tensors(path, tensors, {"note": "test"})
    return tensors


def diffusers_checkpoint(bfl: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in bfl.items():
        module, kind = key.rsplit(".", 1)
        for name, start in DIFFUSERS_OF[module]:
            rows = value.shape[0] // 2 if module == "final_layer.adaLN_modulation.1" else None
            if module == "final_layer.adaLN_modulation.1":  # BFL (shift, scale) -> diffusers (scale, shift)
                out[f"{name}.{kind}"] = torch.cat([value[rows:], value[:rows]]).clone()
                continue
            parts = DIFFUSERS_OF[module]
            stops = [s for _, s in parts[1:]] + [value.shape[0]]
            stop = stops[[n for n, _ in parts].index(name)]
            out[f"{name}.{kind}"] = value[start:stop].clone()
    save_tensors(path, out)
    return out


def peft_lora(path, modules: dict[str, int], seed: int, prefix="transformer.", rank=R) -> dict[str, torch.Tensor]:
    """AI-Toolkit style: `transformer.<diffusers module>.lora_A/lora_B.weight`, no alpha (scale 1)."""
    g = _gen(seed)
    t = {}
    for name, (out_dim, in_dim) in modules.items():
        t[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
        t[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
    save_tensors(path, t)
    return t


LORA_A = {"single_transformer_blocks.0.attn.to_k": (H, H), "single_transformer_blocks.0.attn.to_q": (H, H),
          "transformer_blocks.0.attn.to_out.0": (H, H), "transformer_blocks.0.attn.to_v": (H, H)}
LORA_B = {"single_transformer_blocks.0.attn.to_k": (H, H), "transformer_blocks.0.attn.to_add_out": (H, H),
          "norm_out.linear": (2 * H, H), "transformer_blocks.0.attn.to_q": (H, H)}
# canonical key and row offset of each diffusers module used above
CANON = {"single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1.weight", 0),
         "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1.weight", H),
         "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", 0),
         "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv.weight", 2 * H),
         "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj.weight", 0),
         "transformer_blocks.0.attn.to_add_out": ("double_blocks.0.txt_attn.proj.weight", 0),
         "norm_out.linear": ("final_layer.adaLN_modulation.1.weight", 0)}


def reference_deltas(loras: list[tuple[dict[str, torch.Tensor], float]], prefix="transformer.") \
        -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """canonical key -> {(row start, stop): float64 Σ ratio·B@A on those rows} (norm_out halves swapped back to
    BFL order). Kept per row span so that no full-size float64 weight is built."""
    out: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for tensors, ratio in loras:
        names = {k[len(prefix):].rsplit(".lora_", 1)[0] for k in tensors}
        for name in names:
            b = tensors[f"{prefix}{name}.lora_B.weight"].double()
            a = tensors[f"{prefix}{name}.lora_A.weight"].double()
            d = ratio * (b @ a)
            key, start = CANON[name]
            if name == "norm_out.linear":
                d = torch.cat([d[H:], d[:H]])
            spans = out.setdefault(key, {})
            span = (start, start + d.shape[0])
            spans[span] = spans[span] + d if span in spans else d
    return out


def run(argv: list[str]) -> None:
    parser = flux_merge_lora.setup_parser()
    flux_merge_lora.main(parser.parse_args(argv))


@pytest.fixture(scope="module")
def ai_toolkit_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    a = peft_lora(d / "a.safetensors", LORA_A, seed=1)
    b = peft_lora(d / "b.safetensors", LORA_B, seed=2)
    return d, a, b


@pytest.fixture(scope="module")
def bfl_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "flux.safetensors"
    return path, bfl_checkpoint(path, torch.float32)


def check_merged(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 ref: dict[str, dict[tuple[int, int], torch.Tensor]], tol: float):
    """Touched rows equal W + Σ ratio·ΔW (float64) within `tol` relative; every other row and tensor bit-identical."""
    for key, w in base.items():
        touched = torch.zeros(w.shape[0], dtype=torch.bool)
        for (a, b), d in ref.get(key, {}).items():
            want = w[a:b].double() + d
            err = (out[key][a:b].double() - want).abs().max().item()
            assert err <= tol * want.abs().max().item(), (key, a, err)
            touched[a:b] = True
        assert torch.equal(out[key][~touched], w[~touched]), key


def test_reported_case_into_checkpoint(ai_toolkit_pair, bfl_ckpt, tmp_path):
    d, a, b = ai_toolkit_pair
    ck_path, base = bfl_ckpt
    out_path = tmp_path / "merged.safetensors"
    run(["--flux_model", str(ck_path), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"),
         "--ratios", "0.8", "-0.5", "--save_to", str(out_path), "--working_device", "cpu"])
    out, meta = load_tensors(out_path)
    assert set(out) == set(base)
    ref = reference_deltas([(a, 0.8), (b, -0.5)])
    assert set(ref) == {"single_blocks.0.linear1.weight", "double_blocks.0.img_attn.qkv.weight",
                        "double_blocks.0.img_attn.proj.weight", "double_blocks.0.txt_attn.proj.weight",
                        "final_layer.adaLN_modulation.1.weight"}
    check_merged(out, base, ref, tol=1e-6)
    assert meta["note"] == "test"


def test_reported_case_into_one_lora(ai_toolkit_pair, tmp_path):
    d, a, b = ai_toolkit_pair
    out_path = tmp_path / "ab.safetensors"
    run(["--models", str(d / "a.safetensors"), str(d / "b.safetensors"), "--ratios", "0.8", "-0.5",
         "--save_to", str(out_path), "--working_device", "cpu"])
    out, _ = load_tensors(out_path)
    assert all(k.startswith("lora_unet_") for k in out)
    lora = read_lora(out_path)
    assert lora.format == "kohya"
    from networks import adapter_from_tensors

    ref = reference_deltas([(a, 0.8), (b, -0.5)])
    assert {m.target.key for m in lora.modules} == set(ref)
    for m in lora.modules:
        up, down = adapter_from_tensors(m.tensors).factors()
        r0, r1 = m.target.full_rows

        for (s0, s1), d in ref[m.target.key].items():  # each reference span is exactly those rows of up@down
            assert torch.allclose(up[s0 - r0:s1 - r0].double() @ down.double(), d, atol=1e-6, rtol=0), m.target.key

        # rows of the module outside every reference span are zero (widened exactly, not approximated)
        mask = torch.ones(r1 - r0, dtype=torch.bool)
        for s0, s1 in ref[m.target.key]:
            mask[s0 - r0:s1 - r0] = False
        assert not up[mask].any()
    # linear1 of single block 0 gets to_q, to_k (file a) and to_k (file b): concat stacks three rank-16 modules.
    assert out["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 3 * R


def test_formats_give_identical_checkpoints(tmp_path):
    # the weights the LoRA changes and the small untouched ones (each output copies every tensor)
    keys = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight", *UNTOUCHED]
    ck = tmp_path / "flux.safetensors"
    bfl_checkpoint(ck, torch.bfloat16, seed=3, keys=keys)
    mods = {"transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.to_k": (H, H),
            "transformer_blocks.0.attn.to_out.0": (H, H)}
    peft_lora(tmp_path / "ait.safetensors", mods, seed=4)
    lora = read_lora(tmp_path / "ait.safetensors", family="flux1")
    for fmt in ("kohya", "diffusers"):
        write_through_writer(str(tmp_path / f"{fmt}.safetensors"), lora.modules, lora.family, fmt,
                             dtype=output_dtype([lora]), script="test", args=None, inputs=[], base_metadata=lora.metadata)
    outs = []
    for name in ("ait", "kohya", "diffusers"):
        out = tmp_path / f"m_{name}.safetensors"
        run(["--flux_model", str(ck), "--models", str(tmp_path / f"{name}.safetensors"), "--ratios", "0.7",
             "--save_to", str(out), "--working_device", "cpu"])
        outs.append(load_tensors(out)[0])
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        for k in outs[0]:
            assert torch.equal(other[k], outs[0][k]), k


def test_diffusers_layout_checkpoint_and_sharded(ai_toolkit_pair, bfl_ckpt, tmp_path):
    d, a, b = ai_toolkit_pair
    _ck, base = bfl_ckpt
    diff = diffusers_checkpoint(base, tmp_path / "t.safetensors")
    run(["--flux_model", str(tmp_path / "t.safetensors"), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"),
         "--ratios", "0.8", "-0.5", "--save_to", str(tmp_path / "m.safetensors"), "--working_device", "cpu"])
    out, _ = load_tensors(tmp_path / "m.safetensors")
    assert set(out) == set(diff)
    ref = reference_deltas([(a, 0.8), (b, -0.5)])
    # re-fuse the diffusers output into BFL order and compare with the BFL reference
    fused = {}
    for key in base:
        module, kind = key.rsplit(".", 1)
        pieces = torch.cat([out[f"{n}.{kind}"] for n, _ in DIFFUSERS_OF[module]])
        if module == "final_layer.adaLN_modulation.1":
            pieces = torch.cat([pieces[H:], pieces[:H]])
        fused[key] = pieces
    check_merged(fused, base, ref, tol=1e-6)
    assert torch.equal(out["proj_out.weight"], diff["proj_out.weight"])
    # the same file as a sharded folder with its index json
    import json

    shard = tmp_path / "sharded"
    shard.mkdir()
    keys = sorted(diff)
    half = len(keys) // 2
    save_tensors(shard / "a.safetensors", {k: diff[k] for k in keys[:half]})
    save_tensors(shard / "b.safetensors", {k: diff[k] for k in keys[half:]})
    index = {"metadata": {}, "weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(keys)}}
    (shard / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    run(["--flux_model", str(shard), "--models", str(d / "a.safetensors"), str(d / "b.safetensors"),
         "--ratios", "0.8", "-0.5", "--save_to", str(tmp_path / "m2.safetensors"), "--working_device", "cpu"])
    out2, _ = load_tensors(tmp_path / "m2.safetensors")
    assert out2.keys() == out.keys() and all(torch.equal(out2[k], out[k]) for k in out)


def test_fp8_checkpoint_clamped_and_reported(tmp_path, capsys):
    keys = ["double_blocks.0.img_attn.proj.weight", *UNTOUCHED]  # the weight the LoRA changes and small ones
    ck = tmp_path / "fp8.safetensors"
    base = bfl_checkpoint(ck, torch.float8_e4m3fn, seed=5, keys=keys, scale=100.0)  # values near fp8's 448 limit
    t = peft_lora(tmp_path / "big.safetensors", {"transformer_blocks.0.attn.to_out.0": (H, H)}, seed=6)
    out_path = tmp_path / "m.safetensors"
    run(["--flux_model", str(ck), "--models", str(tmp_path / "big.safetensors"), "--ratios", "300",
         "--save_to", str(out_path), "--working_device", "cpu"])
    err = capsys.readouterr().err
    out, _ = load_tensors(out_path)
    w = out["double_blocks.0.img_attn.proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    wf = w.float()
    assert torch.isfinite(wf).all()
    intended = base["double_blocks.0.img_attn.proj.weight"].double() + 300 * (
        t["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"].double()
        @ t["transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight"].double())
    over = intended.abs() > 448
    assert over.any()
    assert torch.equal(wf[over].abs(), torch.full_like(wf[over], 448.0))  # clamped to the fp8 range
    assert torch.equal(wf[over].sign(), intended[over].sign().float())
    # the realized-vs-intended error is reported and equals the one computed here
    realized = wf.double() - base["double_blocks.0.img_attn.proj.weight"].double()
    delta = intended - base["double_blocks.0.img_attn.proj.weight"].double()
    rel = ((realized - delta).norm() / delta.norm()).item()
    line = next(s for s in err.splitlines() if "relative error" in s)
    reported = float(line.split("relative error ")[1].split()[0])
    assert reported == pytest.approx(rel, rel=1e-3)
    assert torch.equal(out["img_in.weight"].view(torch.uint8), base["img_in.weight"].view(torch.uint8))


def test_text_encoder_parts_are_kept(tmp_path):
    g = _gen(7)
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4, generator=g),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
          "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, H, generator=g),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(H, 4, generator=g),
          "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)}
    save_tensors(tmp_path / "te.safetensors", te)
    # into one LoRA: the CLIP-L module is in the output
    run(["--models", str(tmp_path / "te.safetensors"), "--ratios", "0.5", "--save_to", str(tmp_path / "o.safetensors"),
         "--working_device", "cpu"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    got = out[f"{q}.lora_up.weight"].double() @ out[f"{q}.lora_down.weight"].double() * (
        float(out[f"{q}.alpha"]) / out[f"{q}.lora_down.weight"].shape[0])
    want = 0.5 * 0.5 * te[f"{q}.lora_up.weight"].double() @ te[f"{q}.lora_down.weight"].double()
    assert torch.allclose(got, want, atol=1e-6)
    # into a checkpoint with a CLIP-L file: merged there
    clip = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(768, 768, generator=g),
            "text_model.encoder.layers.0.self_attn.k_proj.weight": torch.randn(768, 768, generator=g),
            "text_model.encoder.layers.0.self_attn.v_proj.weight": torch.randn(768, 768, generator=g),
            "text_model.encoder.layers.0.self_attn.out_proj.weight": torch.randn(768, 768, generator=g)}
    save_tensors(tmp_path / "clip_l.safetensors", clip)
    # nothing here checks the Flux weights: the one the LoRA's UNet module needs and the small ones, in bf16
    keys = ["double_blocks.0.img_attn.proj.weight", *UNTOUCHED]
    bfl_checkpoint(tmp_path / "f.safetensors", torch.bfloat16, seed=8, keys=keys)
    run(["--flux_model", str(tmp_path / "f.safetensors"), "--clip_l", str(tmp_path / "clip_l.safetensors"),
         "--clip_l_save_to", str(tmp_path / "clip_out.safetensors"), "--models", str(tmp_path / "te.safetensors"),
         "--ratios", "0.5", "--save_to", str(tmp_path / "f_out.safetensors"), "--working_device", "cpu"])
    c, _ = load_tensors(tmp_path / "clip_out.safetensors")
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(c[key].double(), clip[key].double() + want, atol=1e-5)
    assert torch.equal(c["text_model.encoder.layers.0.self_attn.k_proj.weight"],
                       clip["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    # into a checkpoint without --clip_l: written to a side LoRA, not dropped
    run(["--flux_model", str(tmp_path / "f.safetensors"), "--models", str(tmp_path / "te.safetensors"),
         "--save_to", str(tmp_path / "g.safetensors"), "--working_device", "cpu"])
    side = read_lora(tmp_path / "g_te_lora.safetensors")
    assert [m.target.component for m in side.modules] == ["te1"]


def test_other_family_is_a_clear_error(tmp_path):
    sd = "real-loras/timohavdk_sd-lora__new.safetensors"
    here = os.path.join(SHARED_DATA, sd)
    if not os.path.exists(here):
        pytest.skip(f"real LoRA {sd} absent")
    with pytest.raises(LoraToolsError, match="not FLUX.1|not a FLUX.1 LoRA"):
        run(["--models", here, "--save_to", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()
    # Flux-named LoRA whose metadata says HunyuanVideo (double/single blocks, linear1/linear2 collide)
    g = _gen(9)
    t = {"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(4, 15360, generator=g),
         "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(H, 4, generator=g)}
    save_tensors(tmp_path / "hv.safetensors", t, {"ss_base_model_version": "hunyuan_video"})
    with pytest.raises(LoraToolsError, match="HunyuanVideo"):
        run(["--models", str(tmp_path / "hv.safetensors"), "--save_to", str(tmp_path / "y.safetensors")])
    # Flux.2 (same diffusers module paths, other widths) is named as such
    t2 = {"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": torch.randn(4, 6144, generator=g),
          "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_B.weight": torch.randn(55296, 4, generator=g)}
    save_tensors(tmp_path / "f2.safetensors", t2)
    with pytest.raises(LoraToolsError, match="FLUX.2"):
        run(["--models", str(tmp_path / "f2.safetensors"), "--save_to", str(tmp_path / "z.safetensors")])
    assert not (tmp_path / "z.safetensors").exists()


def test_diffusers_fuse_lora_oracle(tmp_path):
    """Our merge into a diffusers-layout checkpoint equals diffusers' own load_lora_into_transformer + merge on a
    FluxTransformer2DModel built from a config (full widths, one block of each kind, weights only where needed)."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from accelerate import init_empty_weights
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(cfg)
    g = _gen(11)
    present = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.0.attn.to_out.0", "norm_out.linear"]
    ckpt = {}
    for name in present:
        m = model.get_submodule(name)
        for kind in ("weight", "bias"):
            value = torch.randn(getattr(m, kind).shape, generator=g) * 0.05
            setattr(m, kind, torch.nn.Parameter(value.clone(), requires_grad=False))
            ckpt[f"{name}.{kind}"] = value
    save_tensors(tmp_path / "transformer.safetensors", ckpt)
    changed = {"transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.to_out.0": (H, H),
               "norm_out.linear": (2 * H, H)}
    peft_lora(tmp_path / "lora.safetensors", changed, seed=12)
    run(["--flux_model", str(tmp_path / "transformer.safetensors"), "--models", str(tmp_path / "lora.safetensors"),
         "--save_to", str(tmp_path / "ours.safetensors"), "--working_device", "cpu"])
    ours, _ = load_tensors(tmp_path / "ours.safetensors")

    state, alphas = diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"), return_alphas=True)
    diffusers.FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    for name, m in model.named_modules():
        if isinstance(m, BaseTunerLayer) and name in changed:
            m.merge()
    for name in changed:
        theirs = model.get_submodule(name).base_layer.weight.detach()
        assert torch.allclose(ours[f"{name}.weight"], theirs, rtol=0, atol=1e-6), name
        assert torch.equal(ours[f"{name}.bias"], ckpt[f"{name}.bias"])
    for name in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"):
        assert torch.equal(ours[f"{name}.weight"], ckpt[f"{name}.weight"])


def test_comfy_prefixed_checkpoint_with_loha_and_kohya(tmp_path):
    """`model.diffusion_model.` checkpoint; a LyCORIS LoHa and a kohya LoRA (alpha ≠ rank) mixed in one command."""
    keys = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight", *UNTOUCHED]
    base = bfl_checkpoint(None, torch.float32, seed=13, keys=keys)
    pre = {"model.diffusion_model." + k: v for k, v in base.items()}
    save_tensors(tmp_path / "comfy.safetensors", pre)
    g = _gen(14)
    loha_name, kohya_name = "lycoris_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_img_attn_qkv"
    loha = {f"{loha_name}.hada_w1_a": torch.randn(H, 4, generator=g) * 0.1,
            f"{loha_name}.hada_w1_b": torch.randn(4, H, generator=g) * 0.1,
            f"{loha_name}.hada_w2_a": torch.randn(H, 4, generator=g) * 0.1,
            f"{loha_name}.hada_w2_b": torch.randn(4, H, generator=g) * 0.1, f"{loha_name}.alpha": torch.tensor(2.0)}
    kohya = {f"{kohya_name}.lora_down.weight": torch.randn(8, H, generator=g) * 0.1,
             f"{kohya_name}.lora_up.weight": torch.randn(3 * H, 8, generator=g) * 0.1,
             f"{kohya_name}.alpha": torch.tensor(4.0)}
    save_tensors(tmp_path / "loha.safetensors", loha)
    save_tensors(tmp_path / "kohya.safetensors", kohya)
    run(["--flux_model", str(tmp_path / "comfy.safetensors"), "--models", str(tmp_path / "loha.safetensors"),
         str(tmp_path / "kohya.safetensors"), "--ratios", "0.6", "1.5", "--save_to", str(tmp_path / "o.safetensors"),
         "--working_device", "cpu"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    d_loha = 0.6 * (2.0 / 4) * ((loha[f"{loha_name}.hada_w1_a"].double() @ loha[f"{loha_name}.hada_w1_b"].double())
                                * (loha[f"{loha_name}.hada_w2_a"].double() @ loha[f"{loha_name}.hada_w2_b"].double()))
    d_kohya = 1.5 * (4.0 / 8) * kohya[f"{kohya_name}.lora_up.weight"].double() @ kohya[f"{kohya_name}.lora_down.weight"].double()
    check_merged({k[len("model.diffusion_model."):]: v for k, v in out.items()}, base,
                 {"double_blocks.0.img_attn.proj.weight": {(0, H): d_loha},
                  "double_blocks.0.img_attn.qkv.weight": {(0, 3 * H): d_kohya}}, tol=1e-6)


def test_svd_and_factor_modes_into_one_lora(ai_toolkit_pair, tmp_path):
    d, a, b = ai_toolkit_pair
    ref = reference_deltas([(a, 1.0), (b, 0.5)])
    # svd at a rank that holds everything (≤ 3 inputs of rank 16 per weight) reproduces the exact sum
    run(["--models", str(d / "a.safetensors"), str(d / "b.safetensors"), "--ratios", "1", "0.5", "--mode", "svd",
         "--new_rank", "48", "--format", "diffusers", "--save_to", str(tmp_path / "svd.safetensors"),
         "--working_device", "cpu"])
    from networks import adapter_from_tensors

    lora = read_lora(tmp_path / "svd.safetensors")
    assert lora.format == "diffusers"
    for m in lora.modules:
        up, down = adapter_from_tensors(m.tensors).factors()
        r0, _r1 = m.target.full_rows
        for (s0, s1), want in ref[m.target.key].items():
            if r0 <= s0 and s1 <= r0 + m.target.shape[0]:
                got = up[s0 - r0:s1 - r0].double() @ down.double()
                assert (got - want).norm() <= 1e-5 * want.norm(), m.target.key
    # factor-space add with equal ranks: one input alone on a weight is kept exactly; ties runs through the registry
    run(["--models", str(d / "a.safetensors"), str(d / "b.safetensors"), "--mode", "ties", "--density", "0.5",
         "--save_to", str(tmp_path / "ties.safetensors"), "--format", "comfy", "--working_device", "cpu"])
    assert read_lora(tmp_path / "ties.safetensors").format == "comfy"
    with pytest.raises(LoraToolsError, match="new_rank"):
        run(["--models", str(d / "a.safetensors"), "--mode", "svd", "--save_to", str(tmp_path / "x.safetensors")])


def test_xlabs_and_diffusion_model_prefixed_peft(tmp_path):
    """xlabs processors (`processor.qkv_lora1`, no alpha) and AI-Toolkit's `diffusion_model.` + BFL names, mixed,
    into a diffusers-layout checkpoint (the fused qkv delta lands on to_q/to_k/to_v)."""
    keys = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.proj.weight", *UNTOUCHED]
    base = bfl_checkpoint(None, torch.float32, seed=15, keys=keys)  # only its diffusers form is read
    diffusers_checkpoint(base, tmp_path / "t.safetensors")
    g = _gen(16)
    xl = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(8, H, generator=g) * 0.1,
          "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(3 * H, 8, generator=g) * 0.1}
    dm = {"diffusion_model.double_blocks.0.txt_attn.proj.lora_A.weight": torch.randn(8, H, generator=g) * 0.1,
          "diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight": torch.randn(H, 8, generator=g) * 0.1}
    save_tensors(tmp_path / "xlabs.safetensors", xl)
    save_tensors(tmp_path / "dm.safetensors", dm)
    run(["--flux_model", str(tmp_path / "t.safetensors"), "--models", str(tmp_path / "xlabs.safetensors"),
         str(tmp_path / "dm.safetensors"), "--ratios", "0.5", "2", "--save_to", str(tmp_path / "o.safetensors"),
         "--working_device", "cpu"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    fused = {k: torch.cat([out[f"{n}.weight"] for n, _ in DIFFUSERS_OF[k.rsplit(".", 1)[0]]]) for k in base}
    d_qkv = 0.5 * xl["double_blocks.0.processor.qkv_lora1.up.weight"].double() @ \
        xl["double_blocks.0.processor.qkv_lora1.down.weight"].double()
    d_txt = 2 * dm["diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight"].double() @ \
        dm["diffusion_model.double_blocks.0.txt_attn.proj.lora_A.weight"].double()
    check_merged(fused, base, {"double_blocks.0.img_attn.qkv.weight": {(0, 3 * H): d_qkv},
                               "double_blocks.0.txt_attn.proj.weight": {(0, H): d_txt}}, tol=1e-6)
