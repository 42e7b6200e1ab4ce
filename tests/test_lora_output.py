"""The one LoRA writer (library.lora_output) through every script that writes a LoRA: the same dtype rule,
alpha in float32, kohya hashes of the bytes written (checked against sd-scripts' rule computed here),
the same ss_network_alpha for the same inputs, the seed recorded when something random was drawn."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_lora
import flux_merge_lora
import merge_lora
import resize_lora
import svd_merge_lora
from library.lora_output import output_dtype
from library.safetensors_io import load_tensors
from tests.helpers import run_script

PROJ = "lora_unet_double_blocks_0_img_attn_proj"  # Flux 3072×3072
MLP = "lora_unet_double_blocks_0_img_mlp_2"  # Flux 3072×12288
FLUX_SHAPES = {PROJ: (3072, 3072), MLP: (3072, 12288)}
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1 320×320


def run(script, *argv):
    return run_script(script, argv)


def make_lora(path, shapes, rank, alpha, seed, dtypes=None, metadata=None):
    """A kohya LoRA; `dtypes` per module name (default fp32); alpha tensors in fp32."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (out, inp) in shapes.items():
        dtype = (dtypes or {}).get(name, torch.float32)
        t[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) / 10).to(dtype)
        t[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) / 10).to(dtype)
        t[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(t, str(path), metadata=metadata or {})
    return str(path)


def sd_scripts_hashes(path) -> tuple[str, str]:
    """sd-scripts' rule, written out: sha256 of the bytes after the header; legacy = the first 8 hex digits
    of the sha256 of 0x10000 bytes at offset 0x100000."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def assert_hashed(path):
    meta = load_tensors(path)[1]
    model, legacy = sd_scripts_hashes(path)
    assert meta["sshs_model_hash"] == model and meta["sshs_legacy_hash"] == legacy


# ---------------------------------------------------------------------------------------------------------
# The dtype rule


def _lora_with(*dtypes):
    from library.formats import LoraFile, Module, Target

    modules = [Module(Target(f"k{i}", None, "unet", (4, 4)), {"lora_down.weight": torch.zeros(2, 4, dtype=d),
                                                              "lora_up.weight": torch.zeros(4, 2, dtype=d),
                                                              "alpha": torch.tensor(1.0, dtype=torch.float64)})
               for i, d in enumerate(dtypes)]
    return LoraFile(path="x.safetensors", family="sd1", format="kohya", modules=modules)


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.bfloat16,), torch.bfloat16),
    ((torch.float16, torch.float16), torch.float16),
    ((torch.float16, torch.float32), torch.float32),  # widest
    ((torch.float16, torch.bfloat16), torch.float32),  # neither holds the other
    ((torch.float8_e4m3fn, torch.float8_e5m2), torch.float32),
    ((), torch.float32),
])
def test_output_dtype_is_the_widest_factor_dtype(dtypes, expected):
    # the alphas (fp64 here) never decide
    assert output_dtype([_lora_with(*dtypes[:1]), _lora_with(*dtypes[1:])]) == expected
    assert output_dtype([_lora_with(*dtypes)], "bf16") == torch.bfloat16  # --save_precision wins


@pytest.fixture(scope="module")
def mixed_flux(tmp_path_factory):
    """Two Flux LoRAs, bf16 and fp16, and one file mixing both: every script must write fp32 factors."""
    d = tmp_path_factory.mktemp("mixed")
    a = make_lora(d / "a.safetensors", {PROJ: FLUX_SHAPES[PROJ]}, 4, 2, 1, {PROJ: torch.bfloat16})
    b = make_lora(d / "b.safetensors", {PROJ: FLUX_SHAPES[PROJ]}, 4, 2, 2, {PROJ: torch.float16})
    m = make_lora(d / "m.safetensors", FLUX_SHAPES, 4, 2, 3, {PROJ: torch.bfloat16, MLP: torch.float16})
    return d, a, b, m


def test_dtype_rule_and_fp32_alpha_in_every_script(mixed_flux):
    d, a, b, m = mixed_flux
    outs = {name: str(d / f"{name}.safetensors") for name in ("merge", "flux", "svd", "resize", "convert")}
    run(merge_lora, "--models", a, b, "--save_to", outs["merge"])
    run(flux_merge_lora, "--models", a, b, "--save_to", outs["flux"])
    run(svd_merge_lora, "--models", a, b, "--new_rank", 4, "--save_to", outs["svd"], "--device", "cpu")
    run(resize_lora, "--model", m, "--new_rank", 2, "--save_to", outs["resize"], "--device", "cpu")
    run(convert_lora, m, outs["convert"], "--to", "comfy")
    for name, path in outs.items():
        tensors = load_file(path)
        factors = {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")}
        alphas = {v.dtype for k, v in tensors.items() if k.endswith(".alpha")}
        assert factors == {torch.float32}, name
        assert alphas == {torch.float32}, name
        assert_hashed(path)


# ---------------------------------------------------------------------------------------------------------
# Drift regressions


@pytest.fixture(scope="module")
def big_flux(tmp_path_factory):
    """A Flux LoRA over 1.1 MiB, so that the legacy hash covers real bytes. (Its metadata makes the header
    length not ≡ 0x80 mod 256: safetensors_io's pickle sniffing reads such files as pickles, reported.)"""
    d = tmp_path_factory.mktemp("big")
    return d, make_lora(d / "in.safetensors", {PROJ: FLUX_SHAPES[PROJ]}, 64, 32, 4, metadata={"ss_output_name": "my_lora_v1"})


def test_resize_and_convert_carry_kohya_hashes_of_the_written_bytes(big_flux):
    d, src = big_flux
    resized, converted = str(d / "resized.safetensors"), str(d / "converted.safetensors")
    run(resize_lora, "--model", src, "--new_rank", 48, "--save_to", resized, "--device", "cpu")
    run(convert_lora, src, converted, "--to", "diffusers")
    for path in (resized, converted):
        assert os.path.getsize(path) > 0x110000
        assert_hashed(path)
    assert load_tensors(converted)[1]["ss_output_name"] == "my_lora_v1"


def test_flux_and_merge_lora_write_the_same_network_alpha(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", {PROJ: FLUX_SHAPES[PROJ]}, 4, 2, 5)
    b = make_lora(tmp_path / "b.safetensors", {PROJ: FLUX_SHAPES[PROJ]}, 4, 2, 6)
    merged, fluxed = tmp_path / "m.safetensors", tmp_path / "f.safetensors"
    run(merge_lora, "--models", a, b, "--ratios", 0.8, 0.8, "--save_to", merged)
    run(flux_merge_lora, "--models", a, b, "--ratios", 0.8, 0.8, "--save_to", fluxed)
    for path in (merged, fluxed):
        tensors, meta = load_tensors(path)
        alpha = float(tensors[f"{PROJ}.alpha"])
        # sd-scripts' ss_network_alpha is the alpha the modules store: here |0.8·2/4|·(4+4) = 3.2
        assert alpha == pytest.approx(3.2, rel=1e-6)
        assert meta["ss_network_alpha"] == "3.2" and meta["ss_network_dim"] == "8"  # the fp32 3.2, written short
    assert load_tensors(merged)[1]["ss_network_alpha"] == load_tensors(fluxed)[1]["ss_network_alpha"]


def test_svd_merge_records_the_seed_of_random_block_weights(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", {Q: (320, 320)}, 4, 4, 7)
    b = make_lora(tmp_path / "b.safetensors", {Q: (320, 320)}, 4, 4, 8)
    plain, randomized = tmp_path / "p.safetensors", tmp_path / "r.safetensors"
    common = ["--models", a, b, "--family", "sd1", "--new_rank", 8, "--seed", 11, "--device", "cpu"]
    run(svd_merge_lora, *common, "--save_to", plain)
    run(svd_merge_lora, *common, "--lbws", "1,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R", "-", "--save_to", randomized)
    assert "loratools.seed" not in load_tensors(plain)[1]  # nothing drawn: add over LoRAs is exact
    assert load_tensors(randomized)[1]["loratools.seed"] == "11"
    # merge_lora follows the same rule (it records the seed for random block weights only)
    out = tmp_path / "m.safetensors"
    run(merge_lora, "--models", a, b, "--family", "sd1", "--lbws", "1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "-",
        "--seed", 3, "--save_to", out)
    assert load_tensors(out)[1]["loratools.seed"] == "3"


# ---------------------------------------------------------------------------------------------------------
# --dry_run of the LoRA → LoRA modes: the plan, no maths, nothing written


@pytest.mark.parametrize("script", [merge_lora, flux_merge_lora])
def test_dry_run_prints_the_plan_without_merging(mixed_flux, script, monkeypatch, capsys):
    import library.lora_merge

    def no_maths(*_a, **_k):
        raise AssertionError("--dry_run ran the merge")

    monkeypatch.setattr(library.lora_merge, "combine", no_maths)
    monkeypatch.setattr(library.lora_merge, "_delta_merge", no_maths)
    d, a, b, _ = mixed_flux
    out = d / f"dry_{script.__name__}.safetensors"
    start = time.perf_counter()
    result = run(script, "--models", a, b, "--mode", "ties", "--density", "0.5", "--save_to", out, "--dry_run")
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert not out.exists() and not [p for p in d.iterdir() if p.name.startswith(".tmp")]
    assert f"input {a}: kohya, 1 modules, ratio 1" in text and f"input {b}" in text
    assert "family flux1, mode ties (factor space), 1 targets (lora)" in text
    assert f"output {out}, format kohya" in text
    assert result["plan"].mode == "ties" and elapsed < 5


def test_flux_dry_run_of_a_delta_mode_names_its_space(mixed_flux, capsys):
    d, a, b, _ = mixed_flux
    run(flux_merge_lora, "--models", a, b, "--mode", "ties_svd", "--new_rank", 4, "--dry_run")
    assert "mode ties_svd (delta space)" in capsys.readouterr().err


def test_provenance_parameters_keep_the_mode(mixed_flux):
    d, a, b, _ = mixed_flux
    out = d / "dare.safetensors"
    run(merge_lora, "--models", a, b, "--mode", "dare_linear", "--density", "0.5", "--seed", 9, "--save_to", out)
    meta = load_tensors(out)[1]
    assert json.loads(meta["loratools.parameters"])["mode"] == "dare_linear" and meta["loratools.seed"] == "9"
