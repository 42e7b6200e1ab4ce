"""sd-scripts flags as a pipeline uses them (issue 18, issue 17's extract flags): each accepted with its meaning
or refused/warned clearly, never silently ignored."""

import pytest
import torch

import extract_lora_from_models
import flux_merge_lora
import merge_lora
import resize_lora
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LoraModule,
    dense_delta,
    flux_modules,
    kohya_metadata,
    make_lora,
    run_cli_status,
    run_script,
    sdxl_modules,
    write_lora,
)

SDXL = [LoraModule("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (640, 640)),
        LoraModule("lora_unet_input_blocks_4_0_skip_connection", (640, 320, 1, 1)),  # a 1×1 conv
        LoraModule("lora_unet_input_blocks_1_0_in_layers_2", (320, 320, 3, 3))]


def _pair(tmp_path, rank=4):
    paths = []
    for i in range(2):
        path = str(tmp_path / f"l{i}.safetensors")
        write_lora(path, make_lora(SDXL, rank, alpha=2.0, seed=i, dtype=torch.float32), kohya_metadata("sdxl", rank, 2.0))
        paths.append(path)
    return paths


def test_default_concat_says_rank_and_size_and_the_same_rank_flag(tmp_path, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "ab.safetensors"
    run_script(merge_lora, ["--models", a, b, "--save_to", out])
    err = capsys.readouterr().err
    assert "--mode concat (the default)" in err and "input ranks 4+4 -> output rank 8" in err
    assert "--mode add" in err and "svd_merge_lora.py --new_rank" in err
    tensors, _ = load_tensors(str(out))
    assert tensors[SDXL[0].name + ".lora_down.weight"].shape[0] == 8
    # asked for explicitly: no notice; --mode add is the same-rank (sd-scripts-shaped) result
    for flags in (["--mode", "concat"], ["--concat"]):
        run_script(merge_lora, ["--models", a, b, "--save_to", out, "--overwrite", *flags])
        assert "(the default)" not in capsys.readouterr().err
    run_script(merge_lora, ["--models", a, b, "--save_to", out, "--overwrite", "--mode", "add"])
    assert "(the default)" not in capsys.readouterr().err
    tensors, _ = load_tensors(str(out))
    assert all(tensors[m.name + ".lora_down.weight"].shape[0] == 4 for m in SDXL)
    assert "--mode add" in merge_lora.setup_parser().format_help()  # and --help says so


def test_precision_and_device_not_used_by_lora_merges_are_named(tmp_path, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "ab.safetensors"
    run_script(merge_lora, ["--models", a, b, "--save_to", out, "--mode", "concat", "--precision", "bf16"])
    err = capsys.readouterr().err
    assert "--precision bf16 is not used by a LoRA+LoRA merge" in err
    reference = dense_delta(load_tensors(a)[0], SDXL[0].name) + dense_delta(load_tensors(b)[0], SDXL[0].name)
    merged = dense_delta(load_tensors(str(out))[0], SDXL[0].name)
    assert torch.allclose(merged, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))  # fp32 maths
    args = merge_lora.setup_parser().parse_args(["--models", a, "--save_to", "x.safetensors", "--device", "cuda"])
    from library.cli import unused_compute_flags

    assert unused_compute_flags(args, "a LoRA+LoRA merge", device_used=False)[0].startswith("--device cuda is not used")
    assert unused_compute_flags(args, "x", device_used=True) == []


def test_resize_new_conv_rank_covers_1x1_convs_and_a_raise_is_announced(tmp_path, capsys):
    src = tmp_path / "big.safetensors"
    write_lora(str(src), make_lora(SDXL, 8, alpha=4.0, dtype=torch.float32), kohya_metadata("sdxl", 8, 4.0))
    dst = tmp_path / "small.safetensors"
    run_script(resize_lora, ["--model", src, "--save_to", dst, "--new_rank", "2", "--new_conv_rank", "3"])
    tensors, _ = load_tensors(str(dst))
    ranks = {m.name: tensors[m.name + ".lora_down.weight"].shape[0] for m in SDXL}
    assert ranks == {SDXL[0].name: 2, SDXL[1].name: 3, SDXL[2].name: 3}  # sd-scripts: every 4-D module
    capsys.readouterr()
    run_script(resize_lora, ["--model", src, "--save_to", dst, "--new_rank", "32", "--overwrite", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert "--new_rank 32: 3 of 3 layers have rank 8" in err and "kept as they are" in err
    assert "--precision fp16 is not used by resize" in err
    tensors, _ = load_tensors(str(dst))
    assert all(tensors[m.name + ".lora_down.weight"].shape[0] == 8 for m in SDXL)  # never raised
    for m in SDXL:
        before = dense_delta(load_tensors(str(src))[0], m.name)
        assert torch.allclose(dense_delta(tensors, m.name), before, atol=1e-5 * float(before.abs().max()))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_outputs_are_refused_with_the_reason_and_the_name_to_use(tmp_path, capsys, suffix):
    a, b = _pair(tmp_path)
    status, captured = run_cli_status(merge_lora, ["--models", a, b, "--save_to", str(tmp_path / f"x{suffix}")], capsys)
    assert status == 2
    line = captured.err.strip()
    assert "\n" not in line and "safetensors only" in line and "pickle" in line
    assert f"--save_to {tmp_path / 'x'}.safetensors" in line
    assert not list(tmp_path.glob("x*"))


def _flux_checkpoint(path, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(7)
    # full widths (layouts are found by exact shapes): the weight merged below and small ones it leaves alone,
    # four transformer weights in all (what a partial Flux checkpoint needs)
    shapes = {"double_blocks.0.img_attn.proj.weight": (3072, 3072), "final_layer.linear.weight": (64, 3072),
              "img_in.weight": (3072, 64), "time_in.in_layer.weight": (3072, 256)}
    tensors = {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    save_tensors(str(path), tensors)
    return tensors


def test_flux_save_precision_fp8_into_a_checkpoint_and_into_a_lora(tmp_path):
    modules = [m for m in flux_modules(double_blocks=[0], single_blocks=[0])
               if m.name in ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_0_linear2")]
    lora = make_lora(modules, 4, alpha=4.0, dtype=torch.float32)
    lpath = tmp_path / "f.safetensors"
    write_lora(str(lpath), lora, kohya_metadata("flux1", 4, 4.0))
    base = _flux_checkpoint(tmp_path / "flux.safetensors")
    # into the checkpoint: the img_attn.proj module only (a 3072×15360 linear2 would add 100 MB for nothing checked)
    proj = str(tmp_path / "proj.safetensors")
    write_lora(proj, {k: v for k, v in lora.items() if k.startswith("lora_unet_double_blocks_0_img_attn_proj.")},
               kohya_metadata("flux1", 4, 4.0))
    out = tmp_path / "merged.safetensors"
    run_script(flux_merge_lora, ["--flux_model", tmp_path / "flux.safetensors", "--models", proj, "--save_to", out,
                                 "--save_precision", "fp8"])
    merged, _ = load_tensors(str(out))
    key = "double_blocks.0.img_attn.proj.weight"
    assert merged[key].dtype == torch.float8_e4m3fn  # sd-scripts' plain `fp8` = e4m3fn
    expected = base[key].double() + dense_delta(lora, "lora_unet_double_blocks_0_img_attn_proj")
    assert torch.equal(merged[key], expected.float().to(torch.float8_e4m3fn))
    two = tmp_path / "two.safetensors"
    run_script(flux_merge_lora, ["--models", lpath, lpath, "--save_to", two, "--save_precision", "fp8"])
    tensors, _ = load_tensors(str(two))
    assert tensors["lora_unet_single_blocks_0_linear2.lora_up.weight"].dtype == torch.float8_e4m3fn


def test_extract_accepts_the_load_device_flags(tmp_path, capsys):
    g = torch.Generator().manual_seed(3)
    name = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    base = {name: torch.randn(640, 640, generator=g)}
    change = (torch.randn(640, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 640, generator=g,
                                                                                  dtype=torch.float64))
    tuned = {name: (base[name].double() + change).float()}
    save_tensors(str(tmp_path / "o.safetensors"), base)
    save_tensors(str(tmp_path / "t.safetensors"), tuned)
    out = tmp_path / "x.safetensors"
    run_script(extract_lora_from_models, ["--model_org", tmp_path / "o.safetensors", "--model_tuned",
                                          tmp_path / "t.safetensors", "--save_to", out, "--dim", "2", "--family", "sdxl",
                                          "--load_original_model_to", "cpu", "--load_tuned_model_to", "cpu",
                                          "--device", "cpu"])
    tensors, _ = load_tensors(str(out))
    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    got = dense_delta(tensors, k)
    exact = (tuned[name].double() - base[name].double())
    assert float((got - exact).norm() / exact.norm()) < 1e-5
    if not torch.cuda.is_available():
        status, captured = run_cli_status(extract_lora_from_models, [
            "--model_org", str(tmp_path / "o.safetensors"), "--model_tuned", str(tmp_path / "t.safetensors"),
            "--save_to", str(tmp_path / "y.safetensors"), "--load_tuned_model_to", "cuda"], capsys)
        assert status == 2 and "CUDA is not available" in captured.err


def test_sdxl_modules_builder_still_has_the_1x1_targets():
    # the 1×1 rule matters for real files: SDXL LoCon has skip connections as 1×1 convs
    assert any(len(m.shape) == 4 and m.shape[2:] == (1, 1) for m in sdxl_modules("all", te1=False, te2=False))
