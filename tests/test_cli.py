"""Shared CLI behaviour: toml config with command-line precedence, device choice, error exit codes."""

import argparse
import signal

import pytest
import torch

from library.cli import (
    add_common_args,
    check_counts,
    compute_dtype,
    density,
    finite_float,
    nonnegative_int,
    one_line_errors,
    parse_args,
    positive_int,
    prepare_output,
    resolve_device,
    run_cli,
)
from library.errors import Interrupted, LoraToolsError
from tests.helpers import ROOT


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


# ---- one-line argparse errors and value types ----------------------------------------------------------------

def typed_parser():
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--mode", choices=["add", "ties", "dare"], default="add")
    parser.add_argument("--new_rank", type=int, default=4)
    parser.add_argument("--to", required=True)
    parser.add_argument("--ratio", type=finite_float, default=1.0)
    parser.add_argument("--density", type=density, default=1.0)
    return add_common_args(parser)


@pytest.mark.parametrize("argv,expected", [
    (["--to", "x", "--mode", "sum"], "demo: error: --mode: value 'sum' is not allowed; use one of add, ties, dare"),
    (["--to", "x", "--new_rank", "big"], "demo: error: --new_rank: value 'big' is not an integer"),
    (["--mode", "add"], "demo: error: --to: required but not given (see --help)"),
    (["--to", "x", "--ratio", "nan"], "demo: error: --ratio: value 'nan' is not a finite number"),
    (["--to", "x", "--density", "0"], "demo: error: --density: value '0' must be in (0, 1]: the fraction of entries kept"),
    (["--to", "x", "--save_precision", "fp7"],
     "demo: error: --save_precision: value 'fp7' is not allowed; use one of fp32, float, fp16, bf16, fp8, fp8_e4m3fn, fp8_e5m2"),
    (["--to", "x", "--new_rnak", "3"], "demo: error: unknown argument(s): --new_rnak (did you mean --new_rank?), 3"),
    (["--to"], "demo: error: --to: expected one value"),
])
def test_argparse_errors_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        run_cli(typed_parser, lambda args: None, argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [expected]


def test_value_types():
    assert finite_float("1e3") == 1000.0 and finite_float("-0.5") == -0.5
    for bad in ("nan", "inf", "-inf", "NaN", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            finite_float(bad)
    assert positive_int("3") == 3 and nonnegative_int("0") == 0
    for fn, bad in ((positive_int, "0"), (positive_int, "-2"), (positive_int, "1.5"), (nonnegative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)
    assert density("1") == 1.0 and density("0.25") == 0.25
    for bad in ("0", "-0.1", "1.01", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            density(bad)


def test_config_values_are_checked_like_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("ratio = nan\n")
    with pytest.raises(LoraToolsError, match="ratio: value 'nan' is not a finite number"):
        parse_args(typed_parser(), ["--to", "x", "--config_file", str(cfg)])
    cfg.write_text("mode = 'bogus'\n")
    with pytest.raises(LoraToolsError, match="mode: value 'bogus' is not allowed; use one of add, ties, dare"):
        parse_args(typed_parser(), ["--to", "x", "--config_file", str(cfg)])
    cfg.write_text("ratio = 0.5\nnew_rank = 8\n")
    args = parse_args(typed_parser(), ["--to", "x", "--config_file", str(cfg)])
    assert args.ratio == 0.5 and args.new_rank == 8


@pytest.mark.parametrize("signum,status,what", [(signal.SIGTERM, 143, "terminated by SIGTERM"),
                                                (signal.SIGHUP, 129, "terminated by SIGHUP")])
def test_run_cli_turns_signals_into_exit_status(capsys, signum, status, what):
    def main(args):
        raise Interrupted(signum)

    with pytest.raises(SystemExit) as info:
        run_cli(make_parser, main, [])
    assert info.value.code == status
    assert capsys.readouterr().err.splitlines() == [f"demo: {what}; no output was written, no temporary file left"]
    assert signal.getsignal(signum) == signal.SIG_DFL  # handlers restored after the run


def test_prepare_output_checks_the_report_with_the_output(tmp_path):
    args = argparse.Namespace(overwrite=True, dry_run=False, report=str(tmp_path / "nope" / "r.json"))
    with pytest.raises(LoraToolsError, match="--report: output folder does not exist"):
        prepare_output(str(tmp_path / "o.safetensors"), [], args)
    args.report = str(tmp_path / "o.safetensors")
    with pytest.raises(LoraToolsError, match="--report: output path is also the --save_to output"):
        prepare_output(str(tmp_path / "o.safetensors"), [], args)


def test_precision_names_without_torch_and_sd_scripts_fp8():
    """The choices come from a torch-free module; sd-scripts' plain `fp8` means e4m3fn."""
    import subprocess
    import sys

    import torch

    from library.precision import PRECISION_CHOICES, parse_dtype

    assert "fp8" in PRECISION_CHOICES and parse_dtype("fp8") is torch.float8_e4m3fn
    assert parse_dtype("float") is torch.float32 and parse_dtype(None) is None
    code = "import sys, library.cli, library.precision; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_one_line_error_names_the_main_spelling_of_an_aliased_flag(capsys):
    parser = one_line_errors(argparse.ArgumentParser(prog="demo"))
    parser.add_argument("--new_rank", "--svd_rank", type=positive_int, default=4)
    parser.add_argument("-v", "--verbose", type=positive_int, default=1)
    for argv, flag in ((["--svd_rank", "-2"], "--new_rank"), (["--new_rank", "0"], "--new_rank"), (["-v", "x"], "--verbose")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"demo: error: {flag}: value "), err
