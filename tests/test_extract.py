"""extract_lora_from_models.py: tuned = base + a known delta; every figure checked against float64 maths here.

Checkpoints use real key names (SDXL LDM, Flux BFL) with the real shape *ratios* scaled down.
"""

import json
import math
import os

import pytest
import torch

pytest.importorskip("library.lowrank", reason="library/lowrank.py (randomized SVD, rank rules) has not landed yet")

import extract_lora_from_models as script  # noqa: E402
from library.errors import LoraToolsError  # noqa: E402
from library.safetensors_io import load_tensors, save_tensors  # noqa: E402

SDXL = "model.diffusion_model."
ATTN = SDXL + "input_blocks.4.1.transformer_blocks.0."


def low_rank(rows, cols, rank, gen, scale=0.1):
    """A rank-`rank` matrix with distinct, decaying singular values."""
    u = torch.linalg.qr(torch.randn(rows, rank, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=gen, dtype=torch.float64))[0]
    s = scale * torch.linspace(1.0, 0.2, rank, dtype=torch.float64)
    return (u * s) @ v.T


def make_pair(tmp_path, shapes, *, rank=4, noise=0.0, seed=0, dtype=torch.float32, zero=(), bias_delta=0.01, scales=None):
    """Write base/tuned checkpoints; return paths and the float64 differences actually stored."""
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for key, shape in shapes.items():
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05
        if key.endswith(".bias") or len(shape) == 1:
            d = torch.full(shape, bias_delta, dtype=torch.float64)
        else:
            d = low_rank(shape[0], math.prod(shape[1:]), min(rank, *shape[:2]), gen).reshape(shape)
            d += noise * torch.randn(shape, generator=gen, dtype=torch.float64)
        if key in zero:
            d = torch.zeros_like(d)
        d = d * (scales or {}).get(key, 1.0)
        base[key], tuned[key] = w.to(dtype), (w + d).to(dtype)
    save_tensors(tmp_path / "base.safetensors", base)
    save_tensors(tmp_path / "tuned.safetensors", tuned)
    diffs = {k: tuned[k].double() - base[k].double() for k in shapes}
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), diffs


def run(tmp_path, base, tuned, *extra, out="lora.safetensors"):
    argv = ["--model_org", base, "--model_tuned", tuned, "--save_to", str(tmp_path / out), "--device", "cpu",
            "--overwrite", *extra]
    report = script.main(script.setup_parser().parse_args(argv))
    if "--dry_run" in extra:
        return report, None, None
    tensors, meta = load_tensors(tmp_path / out)
    return report, tensors, meta


def optimal_error(diff, rank):
    """Eckart–Young: the best rank-r Frobenius error, from a float64 SVD."""
    s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1))
    return float(s[rank:].square().sum().sqrt())


def lora_delta(tensors, module, shape, suffix=("lora_up.weight", "lora_down.weight", "alpha")):
    up = tensors[f"{module}.{suffix[0]}"].double()
    down = tensors[f"{module}.{suffix[1]}"].double()
    rank = down.shape[0]
    alpha = float(tensors[f"{module}.{suffix[2]}"]) if suffix[2] and f"{module}.{suffix[2]}" in tensors else rank
    return (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)


COMFY = ["--format", "comfy", "--prefix_model", SDXL, "--prefix_lora", "diffusion_model."]


def test_low_rank_delta_recovered_and_reported(tmp_path):
    shapes = {ATTN + "attn1.to_q.weight": (64, 64), ATTN + "attn2.to_k.weight": (64, 128),
              ATTN + "ff.net.0.proj.weight": (512, 64), ATTN + "ff.net.2.weight": (64, 256)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=4, noise=1e-4)
    report, tensors, _ = run(tmp_path, base, tuned, "--dim", "4", "--report", str(tmp_path / "r.json"), *COMFY)
    for key, shape in shapes.items():
        module = "diffusion_model." + key[len(SDXL):-len(".weight")]
        delta = lora_delta(tensors, module, shape)
        err = float((delta - diffs[key]).norm())
        best = optimal_error(diffs[key], 4)
        assert err <= 1.01 * best + 1e-7, key
        # the report states the error of the stored factors, computed independently here
        entry = next(e for e in report["layers"] if e["key"] == key)
        assert entry["rank_out"] == 4
        assert entry["relative_error"] == pytest.approx(err / float(diffs[key].norm()), rel=1e-3, abs=1e-6)
        assert entry["energy_retained"] == pytest.approx(1 - (err / float(diffs[key].norm())) ** 2, abs=1e-6)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["low_rank_layers"] == 4


def test_randomized_matches_exact_svd(tmp_path):
    # A slowly decaying full-rank difference: the hard case for a sketch.
    gen = torch.Generator().manual_seed(3)
    key = ATTN + "attn1.to_v.weight"
    u = torch.linalg.qr(torch.randn(96, 96, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(80, 80, generator=gen, dtype=torch.float64))[0]
    d = (u[:, :80] * (torch.arange(1, 81, dtype=torch.float64) ** -0.5)) @ v.T * 0.01
    w = torch.randn(96, 80, generator=gen, dtype=torch.float64) * 0.05
    save_tensors(tmp_path / "b.safetensors", {key: w.float()})
    save_tensors(tmp_path / "t.safetensors", {key: (w + d).float()})
    diff = (w + d).float().double() - w.float().double()
    errors = {}
    for mode in ("randomized", "exact"):
        extra = ["--exact_svd"] if mode == "exact" else []
        _, tensors, _ = run(tmp_path, str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--dim", "8",
                            *COMFY, *extra, out=f"{mode}.safetensors")
        module = "diffusion_model." + key[len(SDXL):-len(".weight")]
        errors[mode] = float((lora_delta(tensors, module, (96, 80)) - diff).norm())
    best = optimal_error(diff, 8)
    assert errors["exact"] == pytest.approx(best, rel=1e-5)
    assert errors["randomized"] <= 1.01 * best


def test_full_diff_is_exact_and_bias_diff(tmp_path):
    shapes = {ATTN + "attn1.to_q.weight": (32, 32), ATTN + "attn1.to_out.0.bias": (32,),
              ATTN + "norm1.weight": (32,), SDXL + "input_blocks.1.0.in_layers.2.weight": (16, 8, 3, 3)}
    # fp16 checkpoints (as most are): the difference of two fp16 values is exact in fp32, so full_diff is lossless.
    base, tuned, diffs = make_pair(tmp_path, shapes, dtype=torch.float16)
    _, tensors, _ = run(tmp_path, base, tuned, "--lora_type", "full_diff", "--bias_diff", *COMFY)
    name = {k: "diffusion_model." + k[len(SDXL):].rsplit(".", 1)[0] for k in shapes}
    assert torch.equal(tensors[name[ATTN + "attn1.to_q.weight"] + ".diff"].double(), diffs[ATTN + "attn1.to_q.weight"])
    conv = SDXL + "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(tensors[name[conv] + ".diff"].double(), diffs[conv])
    assert torch.equal(tensors[name[ATTN + "attn1.to_out.0.bias"] + ".diff_b"].double(), diffs[ATTN + "attn1.to_out.0.bias"])
    assert torch.equal(tensors[name[ATTN + "norm1.weight"] + ".diff"].double(), diffs[ATTN + "norm1.weight"])
    # without --bias_diff: biases and 1-D weights are left out, and said so
    report, tensors, _ = run(tmp_path, base, tuned, "--lora_type", "full_diff", *COMFY, out="nobias.safetensors")
    assert not any(k.endswith(".diff_b") for k in tensors)
    assert name[ATTN + "norm1.weight"] + ".diff" not in tensors
    reasons = {e["key"]: e["reason"] for e in report["not_extracted"]}
    assert "--bias_diff" in reasons[ATTN + "attn1.to_out.0.bias"]


def test_standard_with_bias_diff_stores_bias_and_norm_differences(tmp_path):
    shapes = {ATTN + "attn1.to_q.weight": (32, 32), ATTN + "attn1.to_out.0.bias": (32,), ATTN + "norm1.weight": (32,)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=2, bias_delta=0.125, dtype=torch.float16)
    _, tensors, _ = run(tmp_path, base, tuned, "--dim", "2", "--bias_diff", *COMFY)
    prefix = "diffusion_model.input_blocks.4.1.transformer_blocks.0."
    assert torch.equal(tensors[prefix + "attn1.to_out.0.diff_b"].double(), diffs[ATTN + "attn1.to_out.0.bias"])
    assert torch.equal(tensors[prefix + "norm1.diff"].double(), diffs[ATTN + "norm1.weight"])
    assert prefix + "attn1.to_q.lora_up.weight" in tensors


def test_conv_3x3_needs_conv_dim_and_1x1_follows_dim(tmp_path):
    conv = SDXL + "input_blocks.4.0.in_layers.2.weight"
    skip = SDXL + "input_blocks.4.0.skip_connection.weight"
    shapes = {conv: (24, 12, 3, 3), skip: (24, 12, 1, 1)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=3)
    report, tensors, _ = run(tmp_path, base, tuned, "--dim", "3", *COMFY)
    assert [e["key"] for e in report["not_extracted"]] == [conv]
    _, tensors, _ = run(tmp_path, base, tuned, "--dim", "3", "--conv_dim", "3", *COMFY, out="conv.safetensors")
    m = "diffusion_model.input_blocks.4.0.in_layers.2"
    assert tuple(tensors[m + ".lora_down.weight"].shape) == (3, 12, 3, 3)
    assert tuple(tensors[m + ".lora_up.weight"].shape) == (24, 3, 1, 1)
    assert float((lora_delta(tensors, m, (24, 12, 3, 3)) - diffs[conv]).norm()) <= 1e-5 * float(diffs[conv].norm())
    s = "diffusion_model.input_blocks.4.0.skip_connection"
    assert tuple(tensors[s + ".lora_down.weight"].shape) == (3, 12, 1, 1)
    assert float((lora_delta(tensors, s, (24, 12, 1, 1)) - diffs[skip]).norm()) <= 1e-5 * float(diffs[skip].norm())


def test_flux_shaped_layers_generic_peft(tmp_path):
    # BFL names; shape ratios of Flux (qkv 3:1, linear1 7:1, linear2 1:5) at hidden 32.
    shapes = {"double_blocks.0.img_attn.qkv.weight": (96, 32), "single_blocks.0.linear1.weight": (224, 32),
              "single_blocks.0.linear2.weight": (32, 160), "double_blocks.0.img_attn.qkv.bias": (96,)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=4, dtype=torch.bfloat16)
    _, tensors, meta = run(tmp_path, base, tuned, "--dim", "4", "--format", "peft", "--exact_svd")
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["r"] == 4 and config["lora_alpha"] == 4
    for key, shape in shapes.items():
        if key.endswith(".bias"):
            assert key[:-5] + ".diff_b" not in tensors
            continue
        module = key[: -len(".weight")]
        delta = lora_delta(tensors, module, shape, ("lora_B.weight", "lora_A.weight", None))
        # bf16 inputs: the difference itself is what is stored in the files, and is rank 4 up to bf16 rounding
        assert float((delta - diffs[key]).norm()) <= 1.01 * optimal_error(diffs[key], 4) + 1e-6


def test_prefix_filters_and_errors(tmp_path):
    te = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    shapes = {ATTN + "attn1.to_q.weight": (16, 16), te: (16, 16)}
    base, tuned, _ = make_pair(tmp_path, shapes, rank=2)
    _, tensors, _ = run(tmp_path, base, tuned, "--dim", "2", "--format", "comfy", "--prefix_model",
                        "conditioner.embedders.0.transformer.", "--prefix_lora", "text_encoders.clip_l.transformer.")
    assert sorted(tensors) == [f"text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.{s}"
                               for s in ("alpha", "lora_down.weight", "lora_up.weight")]
    with pytest.raises(LoraToolsError, match=r"--prefix_model 'unet\.' matches no key; the file starts with: conditioner"):
        run(tmp_path, base, tuned, "--format", "comfy", "--prefix_model", "unet.", out="x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_mismatched_shapes_and_unrelated_models_are_clear_errors(tmp_path):
    key = ATTN + "attn1.to_q.weight"
    save_tensors(tmp_path / "a.safetensors", {key: torch.zeros(8, 8)})
    save_tensors(tmp_path / "b.safetensors", {key: torch.zeros(8, 16)})
    save_tensors(tmp_path / "c.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)})
    with pytest.raises(LoraToolsError) as info:
        run(tmp_path, str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--format", "peft")
    assert "b.safetensors" in str(info.value) and key in str(info.value) and "(8, 16)" in str(info.value)
    with pytest.raises(LoraToolsError, match="share no key"):
        run(tmp_path, str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"), "--format", "peft")


def test_zero_and_small_differences_are_skipped_and_listed(tmp_path):
    a, b, c = (ATTN + f"attn1.to_{x}.weight" for x in "qkv")
    base, tuned, diffs = make_pair(tmp_path, {a: (16, 16), b: (16, 16), c: (16, 16)}, rank=2, zero=(b,), scales={c: 0.01})
    small = float(diffs[c].abs().max()) * 1.01
    big = float(diffs[a].abs().max())
    assert small < big  # the fixture's two non-zero layers differ in size
    report, tensors, _ = run(tmp_path, base, tuned, "--dim", "2", "--min_diff", str(small), *COMFY)
    skipped = {e["key"]: e.get("skipped") for e in report["layers"]}
    assert skipped[b] == "no difference" and "below --min_diff" in skipped[c] and skipped[a] is None
    assert [k for k in tensors if k.endswith("lora_up.weight")] == [
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up.weight"]
    assert report["summary"]["layers_without_difference"] == 1 and report["summary"]["layers_below_min_diff"] == 1


def test_metadata_dry_run_and_clamp(tmp_path, capsys):
    shapes = {ATTN + "attn1.to_q.weight": (32, 32)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=4, noise=1e-3)
    _, none_written, _ = run(tmp_path, base, tuned, "--dim", "4", "--dry_run", *COMFY, out="dry.safetensors")
    assert not (tmp_path / "dry.safetensors").exists()
    assert "attn1.to_q.weight -> diffusion_model." in capsys.readouterr().out
    _, tensors, meta = run(tmp_path, base, tuned, "--dim", "4", "--save_precision", "fp16", *COMFY)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    inputs = json.loads(meta["loratools.inputs"])
    from library.metadata import file_sha256

    assert inputs == {"base.safetensors": file_sha256(base), "tuned.safetensors": file_sha256(tuned)}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert "sshs_model_hash" in meta and "modelspec.title" in meta
    # The clamp only happens when asked for, and only adds error.
    key = ATTN + "attn1.to_q.weight"
    module = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    _, plain, _ = run(tmp_path, base, tuned, "--dim", "4", *COMFY, out="plain.safetensors")
    _, clamped, _ = run(tmp_path, base, tuned, "--dim", "4", "--clamp_quantile", "0.9", *COMFY, out="clamp.safetensors")
    e_plain = float((lora_delta(plain, module, (32, 32)) - diffs[key]).norm())
    e_clamp = float((lora_delta(clamped, module, (32, 32)) - diffs[key]).norm())
    assert e_plain <= 1.01 * optimal_error(diffs[key], 4) < e_clamp
    _, _, minimal = run(tmp_path, base, tuned, "--dim", "4", "--no_metadata", *COMFY, out="min.safetensors")
    assert "loratools.inputs" not in minimal and minimal["ss_network_dim"] == "4"


def test_dynamic_rank_sv_fro_capped_by_dim(tmp_path):
    key = ATTN + "attn1.to_q.weight"
    base, tuned, diffs = make_pair(tmp_path, {key: (48, 40)}, rank=12)
    s = torch.linalg.svdvals(diffs[key])
    energy = torch.cumsum(s.square(), 0) / s.square().sum()
    expected = int((energy < 0.9**2).sum()) + 1  # fewest leading σ keeping 90 % of the Frobenius norm
    assert 1 < expected < 12
    report, _, meta = run(tmp_path, base, tuned, "--dim", "16", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9",
                          *COMFY)
    entry = report["layers"][0]
    assert entry["rank_out"] == expected
    assert entry["energy_retained"] >= 0.81 - 1e-6
    report, _, _ = run(tmp_path, base, tuned, "--dim", "2", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9",
                       *COMFY, out="capped.safetensors")
    assert report["layers"][0]["rank_out"] == 2


def test_cli_error_is_one_line_with_exit_status_2(tmp_path, capsys):
    key = ATTN + "attn1.to_q.weight"
    save_tensors(tmp_path / "a.safetensors", {key: torch.zeros(8, 8)})
    save_tensors(tmp_path / "b.safetensors", {key: torch.zeros(8, 16)})
    from library.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.setup_parser, script.main, ["--model_org", str(tmp_path / "a.safetensors"), "--model_tuned",
                                                   str(tmp_path / "b.safetensors"), "--save_to", str(tmp_path / "o.safetensors")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "not the same architecture" in err[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_sdxl_kohya_names_and_openclip_in_proj_split_per_slice(tmp_path):
    """--family sdxl (scaled-down UNet layer) and a full-size OpenCLIP in_proj, whose q/k/v rows are
    extracted one by one into kohya's lora_te2_…_{q,k,v}_proj modules."""
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = ATTN + "attn2.to_k.weight"
    shapes = {unet: (64, 128), te1: (48, 48), in_proj: (3840, 1280),
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (3840,)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=3)
    report, tensors, meta = run(tmp_path, base, tuned, "--family", "sdxl", "--dim", "3", "--bias_diff")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    expected = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (unet, None),
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (te1, None)}
    for i, part in enumerate("qkv"):
        expected[f"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj"] = (in_proj, (1280 * i, 1280 * (i + 1)))
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors} == set(expected)
    for module, (key, rows) in expected.items():
        diff = diffs[key] if rows is None else diffs[key][rows[0]:rows[1]]
        delta = lora_delta(tensors, module, tuple(diff.shape))
        assert tensors[module + ".lora_down.weight"].shape[0] == 3
        # every slice of a rank-3 difference has rank ≤ 3: recovered up to the float32 rounding of the
        # stored weights (ulp of |w| ≈ 0.05 against differences ≈ 1e-4: ~3e-5 relative)
        assert float((delta - diff).norm()) <= 1e-4 * float(diff.norm())
    bias = diffs["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"]
    stored = tensors["lora_te2_text_model_encoder_layers_0_self_attn_v_proj.diff_b"].double()
    assert torch.allclose(stored, bias[2560:], rtol=1e-6, atol=0)  # float32 subtraction vs float64


def test_flux_bfl_kohya_names(tmp_path):
    # BFL single-file names (scaled-down widths) with --family flux1 → sd-scripts' lora_flux names.
    shapes = {"double_blocks.0.img_attn.qkv.weight": (96, 32), "single_blocks.3.linear2.weight": (32, 160),
              "double_blocks.0.img_attn.norm.query_norm.scale": (8,)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=2)
    report, tensors, meta = run(tmp_path, base, tuned, "--family", "flux1", "--dim", "2")
    assert sorted(tensors) == sorted(f"lora_unet_{m}.{s}" for m in ("double_blocks_0_img_attn_qkv", "single_blocks_3_linear2")
                                     for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    delta = lora_delta(tensors, "lora_unet_single_blocks_3_linear2", (32, 160))
    diff = diffs["single_blocks.3.linear2.weight"]
    assert float((delta - diff).norm()) <= 1e-5 * float(diff.norm())


def test_flux_diffusers_layout_q_k_v_fused_into_kohya_qkv(tmp_path):
    # A diffusers-layout Flux transformer (real 3072 width, one block): to_q/to_k/to_v are rows of BFL's fused
    # img_attn.qkv. Each is extracted on its own (rank 2) and the writer fuses them exactly (block-diagonal, rank 6).
    keys = [f"transformer_blocks.0.attn.to_{p}.weight" for p in "qkv"]
    base, tuned, diffs = make_pair(tmp_path, {k: (3072, 3072) for k in keys}, rank=2)
    _, tensors, _ = run(tmp_path, base, tuned, "--family", "flux1", "--dim", "2")
    module = "lora_unet_double_blocks_0_img_attn_qkv"
    assert {k for k in tensors} == {f"{module}.{s}" for s in ("alpha", "lora_down.weight", "lora_up.weight")}
    assert tensors[f"{module}.lora_down.weight"].shape == (6, 3072)
    fused = torch.cat([diffs[k] for k in keys])
    delta = lora_delta(tensors, module, (9216, 3072))
    # each difference is rank 2 up to the float32 rounding of the stored weights (~3e-5 relative)
    for i, k in enumerate(keys):
        rows = slice(3072 * i, 3072 * (i + 1))
        assert float((delta[rows] - fused[rows]).norm()) <= 1e-4 * float(fused[rows].norm()), k


class _HeaderOnly:
    """A checkpoint's key/shape listing without data: detection reads nothing else."""

    def __init__(self, shapes, path):
        self.shapes, self.path = shapes, path

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def test_family_mismatch_and_flag_checks_are_clear_errors():
    import argparse

    from library.extract.output import _detect_family
    from library.formats import FAMILIES

    sdxl = _HeaderOnly(dict(FAMILIES["sdxl"].table.shapes), "sdxl.safetensors")
    flux = _HeaderOnly(dict(FAMILIES["flux1"].table.shapes), "flux.safetensors")
    args = argparse.Namespace(family=None, sdxl=False, v2=False)
    pair = argparse.Namespace(base=sdxl, tuned=sdxl, base_path=sdxl.path, tuned_path=sdxl.path)
    assert _detect_family(pair, args) == "sdxl"
    mixed = argparse.Namespace(base=sdxl, tuned=flux, base_path=sdxl.path, tuned_path=flux.path)
    with pytest.raises(LoraToolsError, match="base model is sdxl but the tuned model is flux1"):
        _detect_family(mixed, args)
    with pytest.raises(LoraToolsError, match="--v2 was given but the checkpoint is sdxl"):
        _detect_family(pair, argparse.Namespace(family=None, sdxl=False, v2=True))
    with pytest.raises(LoraToolsError, match="unknown --family"):
        _detect_family(pair, argparse.Namespace(family="sd9", sdxl=False, v2=False))


def test_load_precision_casts_before_subtracting(tmp_path):
    key = ATTN + "attn1.to_q.weight"
    base, tuned, _ = make_pair(tmp_path, {key: (16, 16)}, rank=2)
    _, tensors, _ = run(tmp_path, base, tuned, "--lora_type", "full_diff", "--load_precision", "bf16", *COMFY)
    b, t = load_tensors(base)[0][key], load_tensors(tuned)[0][key]
    expected = t.bfloat16().float() - b.bfloat16().float()  # sd-scripts: both models loaded in that dtype
    assert torch.equal(tensors["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.diff"], expected)


def shard(path, tensors, shards):
    """Write `tensors` as a diffusers-style sharded folder (`shards`: key lists, one per shard file)."""
    path.mkdir()
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(path / name, {k: tensors[k] for k in keys})
        weight_map.update({k: name for k in keys})
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(path)


def test_sharded_folders_extract_like_single_files(tmp_path):
    shapes = {ATTN + "attn1.to_q.weight": (64, 64), ATTN + "attn2.to_k.weight": (64, 128),
              ATTN + "ff.net.2.weight": (64, 256)}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=3)
    keys = list(shapes)
    split = [keys[:1], keys[1:]]
    sharded = [shard(tmp_path / name, load_tensors(path)[0], split) for name, path in (("b", base), ("t", tuned))]
    _, single, _ = run(tmp_path, base, tuned, "--dim", "3", *COMFY, out="single.safetensors")
    _, tensors, meta = run(tmp_path, *sharded, "--dim", "3", *COMFY, out="sharded.safetensors")
    assert tensors.keys() == single.keys()
    for key, value in tensors.items():
        assert torch.equal(value, single[key]), key
    hashed = json.loads(meta["loratools.inputs"])
    # Base and tuned shards share their file names: each keeps its own hash (they used to overwrite each other).
    from library.metadata import file_sha256

    names = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
    assert hashed == {f"{folder}/{name}": file_sha256(os.path.join(path, name))
                      for folder, path in zip("bt", sharded) for name in names}


def test_nonfinite_weights_are_refused_naming_file_and_count(tmp_path, capsys):
    from library.cli import run_cli

    shapes = {ATTN + f"attn1.to_{x}.weight": (32, 32) for x in "qkv"} | {ATTN + "ff.net.2.weight": (32, 64)}
    base, tuned, _ = make_pair(tmp_path, shapes, rank=2)
    tensors = load_tensors(tuned)[0]
    bad = [ATTN + "attn1.to_k.weight", ATTN + "ff.net.2.weight"]
    tensors[bad[0]][0, 0] = float("nan")
    tensors[bad[1]][1, 2] = float("-inf")
    save_tensors(tuned, tensors, overwrite=True)
    out = tmp_path / "lora.safetensors"
    with pytest.raises(SystemExit) as info:
        run_cli(script.setup_parser, script.main, ["--model_org", base, "--model_tuned", tuned, "--save_to", str(out),
                                                   "--dim", "2", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert info.value.code == 2 and not out.exists() and len(lines) == 1
    assert lines[0].endswith(f"{tuned}: 2 tensor(s) contain NaN or inf: {bad[0]}, {bad[1]}; a low-rank decomposition "
                              "of such a layer is undefined (repair or drop these modules)")


def test_svd_tol_stops_early_only_where_the_spectrum_allows_and_keeps_1_01(tmp_path, capsys):
    # to_q: a rank-4 delta at --dim 4 over a tiny noise floor (a big gap at k: one iteration is enough);
    # ff.net.2: a slowly decaying full-rank delta (the iterations keep paying off).
    gen = torch.Generator().manual_seed(11)
    q, ff = ATTN + "attn1.to_q.weight", ATTN + "ff.net.2.weight"
    base = {q: torch.randn(96, 96, generator=gen, dtype=torch.float64) * 0.05,
            ff: torch.randn(96, 384, generator=gen, dtype=torch.float64) * 0.05}
    u = torch.linalg.qr(torch.randn(96, 96, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(384, 96, generator=gen, dtype=torch.float64))[0]
    slow = (u * torch.arange(1, 97, dtype=torch.float64) ** -0.3 * 0.01) @ v.T
    deltas = {q: low_rank(96, 96, 4, gen) + 1e-6 * torch.randn(96, 96, generator=gen, dtype=torch.float64), ff: slow}
    save_tensors(tmp_path / "base.safetensors", {k: w.float() for k, w in base.items()})
    save_tensors(tmp_path / "tuned.safetensors", {k: (base[k] + deltas[k]).float() for k in base})
    diffs = {k: (base[k] + deltas[k]).float().double() - base[k].float().double() for k in base}
    b, t = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    iters = {}
    for tol in ("0.001", "0"):
        report, tensors, _ = run(tmp_path, b, t, "--dim", "4", "--svd_iters", "3", "--svd_tol", tol, *COMFY, "-v")
        iters[tol] = {e["key"]: e["power_iters"] for e in report["layers"] if "power_iters" in e}
        for key in base:
            module = "diffusion_model." + key[len(SDXL):-len(".weight")]
            err = float((lora_delta(tensors, module, diffs[key].shape) - diffs[key]).norm())
            assert err <= 1.01 * optimal_error(diffs[key], 4), (tol, key)
    assert iters["0.001"][q] == 1 and iters["0.001"][ff] >= 2
    assert iters["0"] == {}  # no adaptive rule: every layer runs --svd_iters, not reported per layer
    out = capsys.readouterr().out
    assert "power iterations per layer (adaptive, --svd_tol): 1 × 1, 1 × " in out
    # -v's profile: one line per stage, the prefetch thread's named as such, and the wall time
    for stage in ("prefetch_0: read", "prefetch_0: subtract (float32)", "power iterations (matmul)", "qr", "sketch",
                  "norm and max |difference|", "error of the stored factors", "writing", "hashing: sha256 of the inputs",
                  "wall"):
        assert f"\n{stage} " in out, stage
    with pytest.raises(LoraToolsError, match="--svd_tol: value -1 must be 0 or more"):
        run(tmp_path, b, t, "--svd_tol", "-1")


def test_prefetcher_gives_every_key_in_order_and_reads_on_the_caller_after_stop(tmp_path):
    from library.extract.layers import ExtractOptions, PairPrefetcher
    from library.extract.pairs import CheckpointPair

    shapes = {ATTN + f"attn1.to_{x}.weight": (16, 16) for x in "qkv"}
    base, tuned, diffs = make_pair(tmp_path, shapes, rank=2)
    keys = list(shapes)
    with CheckpointPair(base, tuned) as pair, PairPrefetcher(pair, keys, ExtractOptions()) as prefetcher:
        delta, finite, _ = prefetcher.take(keys[0])
        assert finite and torch.allclose(delta.double(), diffs[keys[0]], atol=1e-7)
        prefetcher.stop()
        for key in keys[1:]:
            delta, finite, _ = prefetcher.take(key)
            assert finite and torch.allclose(delta.double(), diffs[key], atol=1e-7)
