"""Shared CLI behaviour: toml config with command-line precedence, device choice, error exit codes."""

import argparse

import pytest
import torch

from library.cli import add_common_args, check_counts, compute_dtype, parse_args, prepare_output, resolve_device, run_cli
from library.errors import LoraToolsError


def make_parser():
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--new_rank", type=int, default=4)
    parser.add_argument("--save_to")
    return add_common_args(parser)


def test_config_file_gives_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('new_rank = 16\nsave_precision = "fp16"\n[inputs]\nmodels = ["a.safetensors", "b.safetensors"]\n')
    args = parse_args(make_parser(), ["--config_file", str(cfg)])
    assert args.new_rank == 16 and args.save_precision == "fp16" and args.models == ["a.safetensors", "b.safetensors"]
    args = parse_args(make_parser(), ["--config_file", str(cfg), "--new_rank", "8"])
    assert args.new_rank == 8


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("new_rnak = 3\n")
    with pytest.raises(LoraToolsError, match="new_rnak"):
        parse_args(make_parser(), ["--config_file", str(bad)])
    with pytest.raises(LoraToolsError, match="not found"):
        parse_args(make_parser(), ["--config_file", str(tmp_path / "missing.toml")])


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(LoraToolsError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(LoraToolsError, match="unknown --device"):
        resolve_device("tpu")
    assert compute_dtype(argparse.Namespace(precision="bf16")) == torch.bfloat16
    with pytest.raises(LoraToolsError, match="fp8"):
        compute_dtype(argparse.Namespace(precision="fp8_e4m3fn"))


def test_output_checks(tmp_path):
    args = argparse.Namespace(overwrite=False, dry_run=False)
    with pytest.raises(LoraToolsError, match="--save_to is required"):
        prepare_output(None, [], args)
    with pytest.raises(LoraToolsError, match="must end in .safetensors"):
        prepare_output(str(tmp_path / "x.ckpt"), [], args)
    assert prepare_output(None, [], argparse.Namespace(dry_run=True)) is None
    with pytest.raises(LoraToolsError, match="--ratios has 1 values but 2 models"):
        check_counts([1.0], ["a", "b"], "--ratios")


def test_run_cli_user_error_is_one_line_exit_2(capsys):
    def main(args):
        raise LoraToolsError("something is wrong", file="x.safetensors", key="lora_unet_a")

    with pytest.raises(SystemExit) as info:
        run_cli(make_parser, main, [])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["demo: error: x.safetensors: lora_unet_a: something is wrong"]


def test_run_cli_debug_keeps_traceback():
    def main(args):
        raise LoraToolsError("boom")

    with pytest.raises(LoraToolsError):
        run_cli(make_parser, main, ["--debug"])
