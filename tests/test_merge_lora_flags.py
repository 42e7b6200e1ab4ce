"""Flags of merge_lora.py and flux_merge_lora.py that refuse nonsense (issue 11): non-finite strengths,
densities outside (0, 1], non-positive ranks, ratio counts that do not match --models, and flux outputs
that collide. Each is exit 2 with ONE stderr line naming the flag and the value, before any work: no
output, no temporary file, every input byte-identical."""

import pytest
import torch
from safetensors.torch import save_file

import flux_merge_lora
import merge_lora
from library.cli import run_cli
from tests.helpers import fingerprints, kohya_lora, temp_files

FLUX_MODULE = "lora_unet_double_blocks_0_img_attn_proj"  # kohya name of Flux's double_blocks.0.img_attn.proj


def flux_lora(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    save_file({f"{FLUX_MODULE}.lora_down.weight": torch.randn(2, 3072, generator=g),
               f"{FLUX_MODULE}.lora_up.weight": torch.randn(3072, 2, generator=g),
               f"{FLUX_MODULE}.alpha": torch.tensor(1.0)}, str(path))
    return str(path)


def refused(script, argv, folder, capsys):
    """Run `script` on argv; return its one stderr line after checking exit 2, no output and no temp file."""
    before = fingerprints(folder)
    with pytest.raises(SystemExit) as info:
        run_cli(script.setup_parser, script.main, [str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert len(err) == 1, err
    assert fingerprints(folder) == before  # nothing written, nothing changed
    assert temp_files(folder) == []
    return err[0]


MERGE_CASES = [
    (["--ratios", "nan"], "--ratios", "'nan'"),
    (["--ratios", "inf"], "--ratios", "'inf'"),
    (["--density", "0", "--mode", "ties"], "--density", "'0'"),
    (["--density", "1.5", "--mode", "ties"], "--density", "'1.5'"),
    (["--density", "nan", "--mode", "ties"], "--density", "'nan'"),
    (["--lbw_x", "inf"], "--lbw_x", "'inf'"),
    (["--ratios", "1", "0.5"], "--ratios", "2 values"),
    (["--ratios"], "--ratios", "0 values"),
]


@pytest.mark.parametrize("extra,flag,value", MERGE_CASES)
def test_merge_lora_refuses(tmp_path, capsys, extra, flag, value):
    a = tmp_path / "a.safetensors"
    save_file(kohya_lora(), str(a))
    line = refused(merge_lora, ["--models", a, "--save_to", tmp_path / "out.safetensors", *extra], tmp_path, capsys)
    assert flag in line and value in line, line


FLUX_CASES = MERGE_CASES[:5] + [
    (["--mode", "svd", "--new_rank", "-4"], "--new_rank", "'-4'"),
    (["--mode", "svd", "--new_rank", "0"], "--new_rank", "'0'"),
    (["--mode", "svd", "--new_rank", "2.5"], "--new_rank", "'2.5'"),
    (["--ratios", "1", "0.5"], "--ratios", "2 values"),
]


@pytest.mark.parametrize("extra,flag,value", FLUX_CASES)
def test_flux_merge_lora_refuses(tmp_path, capsys, extra, flag, value):
    a = flux_lora(tmp_path / "a.safetensors")
    line = refused(flux_merge_lora, ["--models", a, "--save_to", tmp_path / "out.safetensors", *extra], tmp_path,
                   capsys)
    assert flag in line and value in line, line


def test_flux_outputs_that_collide_are_refused_before_any_work(tmp_path, capsys):
    """--save_to equal to --clip_l_save_to: refused before a file is read. The inputs are not even valid
    checkpoints, so an error found after reading would name them instead of the two flags."""
    a = flux_lora(tmp_path / "a.safetensors")
    for name in ("flux.safetensors", "clip_l.safetensors"):
        (tmp_path / name).write_bytes(b"not read: the outputs are checked first")
    same = tmp_path / "out.safetensors"
    line = refused(flux_merge_lora, ["--flux_model", tmp_path / "flux.safetensors", "--clip_l",
                                     tmp_path / "clip_l.safetensors", "--models", a, "--save_to", same,
                                     "--clip_l_save_to", same], tmp_path, capsys)
    assert "--clip_l_save_to" in line and "--save_to" in line and "its own file" in line, line


def test_flux_te_lora_output_equal_to_an_input_is_refused_first(tmp_path, capsys):
    a = flux_lora(tmp_path / "a.safetensors")
    (tmp_path / "flux.safetensors").write_bytes(b"not read")
    line = refused(flux_merge_lora, ["--flux_model", tmp_path / "flux.safetensors", "--models", a,
                                     "--save_to", tmp_path / "out.safetensors", "--te_lora_save_to", a],
                   tmp_path, capsys)
    assert "--te_lora_save_to" in line and "one of the inputs" in line, line


def test_flux_lora_merge_without_save_to_is_refused_before_reading(tmp_path, capsys):
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(b"not read: the missing output is found first")
    line = refused(flux_merge_lora, ["--models", bad], tmp_path, capsys)
    assert line.endswith("error: --save_to is required"), line
