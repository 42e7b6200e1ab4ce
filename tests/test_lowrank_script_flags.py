"""svd_merge_lora.py, resize_lora.py, extract_lora_from_models.py: every numeric flag
refuses nonsense in one line (exit 2, the flag and the value named, nothing written, inputs untouched), and
resize says when the target rank is not below the file's ranks."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from library.cli import run_cli
from library.lowrank_rules import check_dynamic_flags
from library.safetensors_io import load_tensors, save_tensors

SCRIPTS = ["svd_merge_lora.py", "resize_lora.py", "extract_lora_from_models.py"]

def test_dynamic_methods_live_in_one_torch_free_list():
    from library import lowrank, lowrank_rules

    assert lowrank.DYNAMIC_METHODS is lowrank_rules.DYNAMIC_METHODS


@pytest.mark.parametrize("method,param", [("sv_ratio", 1.0), ("sv_ratio", 1e6), ("sv_fro", 1.0), ("sv_fro", 1e-9),
                                          ("sv_cumulative", 1.0), ("sv_cumulative", 0.5), (None, None)])
def test_dynamic_param_in_range_is_accepted(method, param):
    check_dynamic_flags(method, param)


# ---- fixtures: real SDXL names, small shapes -------------------------------------------------------------

UNET = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
SDXL_ATTN = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0."


def kohya_lora(path, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in {UNET + "attn1_to_q": (640, 640), UNET + "attn2_to_k": (640, 2048)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    save_tensors(str(path), tensors, {"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})
    return str(path)


def checkpoint_pair(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {SDXL_ATTN + "attn1.to_q.weight": torch.randn(64, 64, generator=gen)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_tensors(str(tmp_path / "base.safetensors"), base)
    save_tensors(str(tmp_path / "tuned.safetensors"), tuned)
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


def inputs_for(script, tmp_path):
    if script == "extract_lora_from_models.py":
        base, tuned = checkpoint_pair(tmp_path)
        return [base, tuned], ["--model_org", base, "--model_tuned", tuned, "--family", "sdxl"]
    a = kohya_lora(tmp_path / "a.safetensors", 8, 1)
    if script == "resize_lora.py":
        return [a], ["--model", a, "--family", "sdxl"]
    b = kohya_lora(tmp_path / "b.safetensors", 4, 2)
    return [a, b], ["--models", a, b, "--family", "sdxl"]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_script(script, argv, capsys):
    """The script through run_cli: (exit status, stdout, stderr lines)."""
    module = __import__(script[:-3])
    try:
        run_cli(module.setup_parser, module.main, argv)
        status = 0
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


DYNAMIC = {"sv_ratio": ["--dynamic_method", "sv_ratio", "--dynamic_param"],
           "sv_fro": ["--dynamic_method", "sv_fro", "--dynamic_param"],
           "sv_cumulative": ["--dynamic_method", "sv_cumulative", "--dynamic_param"]}
RANKS = {"svd_merge_lora.py": ("--new_rank", "--new_conv_rank", "--svd_rank", "--svd_conv_rank"),
         "resize_lora.py": ("--new_rank", "--new_conv_rank"),
         "extract_lora_from_models.py": ("--dim", "--conv_dim", "--rank")}
ITERS = {"svd_merge_lora.py": ("--svd_oversample", "--svd_power_iters"),
         "resize_lora.py": ("--svd_oversample", "--svd_power_iters"),
         "extract_lora_from_models.py": ("--oversample", "--svd_iters")}

ALIASES = {flag: group for group in (("--new_rank", "--svd_rank"), ("--new_conv_rank", "--svd_conv_rank"),
                                     ("--dim", "--rank")) for flag in group}
# (script, flags before the value, the value, the flag the message must name)
BAD = [(s, [flag], value, flag) for s, flags in RANKS.items() for flag in flags for value in ("0", "-4", "2.5")]
BAD += [(s, [flag], value, flag) for s, flags in ITERS.items() for flag in flags for value in ("-1", "x")]
BAD += [(s, DYNAMIC[method], value, "--dynamic_param") for s in SCRIPTS
        for method, value in (("sv_ratio", "0.5"), ("sv_ratio", "nan"), ("sv_fro", "0"), ("sv_fro", "1.5"),
                              ("sv_cumulative", "-0.1"), ("sv_cumulative", "inf"))]
BAD += [(s, ["--dynamic_method", "sv_fro"], None, "--dynamic_param") for s in SCRIPTS]  # no parameter at all
BAD += [(s, ["--clamp_quantile"], value, "--clamp_quantile") for s in ("svd_merge_lora.py", "extract_lora_from_models.py")
        for value in ("0", "1.5", "nan")]
BAD += [("svd_merge_lora.py", ["--ratios"], value, "--ratios") for value in ("nan", "inf")]
BAD += [("svd_merge_lora.py", ["--ratios", "1"], value, "--ratios") for value in ("nan",)]
BAD += [("svd_merge_lora.py", ["--mode", "ties", "--density"], value, "--density") for value in ("nan", "1.5", "0", "-1")]
BAD += [("svd_merge_lora.py", ["--lbw_x"], "nan", "--lbw_x")]
BAD += [("extract_lora_from_models.py", ["--min_diff"], value, "--min_diff") for value in ("nan", "-1")]


@pytest.mark.parametrize("script,flags,value,named", BAD, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_flag_values_are_refused_in_one_line(script, flags, value, named, tmp_path, capsys):
    inputs, argv = inputs_for(script, tmp_path)
    before = {p: sha256(p) for p in inputs}
    listing = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "out.safetensors")
    status, stdout, err = run_script(script, [*argv, "--save_to", out, "--device", "cpu", "--report",
                                              str(tmp_path / "r.json"), *flags, *([value] if value else [])], capsys)
    assert status == 2
    assert len(err) == 1, err
    # a flag with an alias may be named by either spelling (argparse reports the last one)
    assert any(name in err[0] for name in ALIASES.get(named, (named,))) and (value is None or value in err[0]), err[0]
    assert stdout == ""
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no report, no temporary file
    assert {p: sha256(p) for p in inputs} == before


def test_a_count_of_ratios_that_does_not_match_the_models_is_refused_before_any_work(tmp_path, capsys):
    inputs, argv = inputs_for("svd_merge_lora.py", tmp_path)
    listing = sorted(os.listdir(tmp_path))
    for ratios in (["1"], ["1", "1", "1"]):
        status, stdout, err = run_script("svd_merge_lora.py",
                                         [*argv, "--ratios", *ratios, "--save_to", str(tmp_path / "o.safetensors")], capsys)
        assert status == 2 and stdout == ""
        assert len(err) == 1 and err[0].endswith(f": error: --ratios has {len(ratios)} values but 2 models were given")
        assert sorted(os.listdir(tmp_path)) == listing


# ---- resize: a target at or above the file's ranks is said, not silently ignored ---------------------------

def test_resize_to_a_rank_not_below_the_files_warns_once_and_keeps_the_ranks(tmp_path, capsys):
    [src], argv = inputs_for("resize_lora.py", tmp_path)  # rank 8 everywhere
    out = str(tmp_path / "out.safetensors")
    status, stdout, err = run_script("resize_lora.py", [*argv, "--new_rank", "32", "--save_to", out, "--device", "cpu"],
                                     capsys)
    assert status == 0
    assert err == ["warning: --new_rank 32: 2 of 2 layers have rank 8; ranks already at or below the target are kept "
                   "as they are"]
    written, _ = load_tensors(out)
    original, _ = load_tensors(src)
    downs = [k for k in written if k.endswith("lora_down.weight")]
    assert len(downs) == 2 and all(written[k].shape[0] == 8 for k in downs)
    for name in (UNET + "attn1_to_q", UNET + "attn2_to_k"):  # the same delta, to rounding
        exact = kohya_delta(original, name)
        assert float((kohya_delta(written, name) - exact).norm() / exact.norm()) < 1e-5


def kohya_delta(tensors, name):
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * up @ down


def test_resize_below_the_files_ranks_or_dynamic_says_nothing(tmp_path, capsys):
    _, argv = inputs_for("resize_lora.py", tmp_path)
    for i, extra in enumerate((["--new_rank", "4"], ["--new_rank", "32", "--dynamic_method", "sv_fro",
                                                      "--dynamic_param", "0.9"])):
        status, _, err = run_script("resize_lora.py", [*argv, *extra, "--save_to", str(tmp_path / f"o{i}.safetensors"),
                                                       "--device", "cpu"], capsys)
        assert status == 0 and err == []


def test_resize_warning_counts_only_the_layers_at_or_below_the_target(tmp_path, capsys):
    from library.resize import ResizeJob, ResizeSettings
    from library.resize_io import kept_as_they_are
    from networks import adapter_from_tensors

    def job(name, rank, shape=(64, 32)):
        tensors = {"lora_down.weight": torch.ones(rank, shape[1]), "lora_up.weight": torch.ones(shape[0], rank)}
        return ResizeJob(name, shape, adapter_from_tensors(tensors, name))

    jobs = [job("a", 4), job("b", 16), job("c", 8)]
    assert kept_as_they_are(jobs, ResizeSettings(new_rank=8)) == \
        "--new_rank 8: 2 of 3 layers have rank 4, 8; ranks already at or below the target are kept as they are"
    assert kept_as_they_are(jobs, ResizeSettings(new_rank=2)) is None
    assert kept_as_they_are(jobs, ResizeSettings(new_rank=32, dynamic_method="sv_fro", dynamic_param=0.5)) is None
