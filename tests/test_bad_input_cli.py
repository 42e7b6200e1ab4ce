"""Bad input through real scripts: one-line error naming the file, exit status 2, no output file left."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ROOT, sha256

MODULE = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def good_lora(path):
    save_file({f"{MODULE}.lora_down.weight": torch.randn(4, 640), f"{MODULE}.lora_up.weight": torch.randn(640, 4),
               f"{MODULE}.alpha": torch.tensor(2.0)}, str(path))
    return str(path)


def write_raw(path, header, data=b""):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def make_bad(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated":
        raw = Path(good_lora(tmp_path / "src.safetensors")).read_bytes()
        path.write_bytes(raw[: len(raw) - 100])
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    elif case == "invalid_json":
        path.write_bytes(struct.pack("<Q", 8) + b"{oops!!}")
    elif case == "unknown_dtype":
        write_raw(path, {f"{MODULE}.alpha": {"dtype": "Q4", "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "overlap":
        write_raw(path, {f"{MODULE}.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         f"{MODULE}.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                  b"\0" * 12)
    elif case == "not_safetensors":
        path.write_text("<html>a download error page, not a LoRA</html>" * 3)
    elif case == "missing":
        pass
    return str(path)


def run(script, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


CASES = ["truncated", "header_too_long", "invalid_json", "unknown_dtype", "overlap", "not_safetensors", "missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_lora_file(tmp_path, case):
    bad = make_bad(tmp_path, case)
    out = tmp_path / "out.safetensors"
    proc = run("resize_lora.py", "--model", bad, "--new_rank", "2", "--save_to", str(out), "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and os.path.basename(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_output_equal_to_input_is_refused(tmp_path):
    src = good_lora(tmp_path / "lora.safetensors")
    before = Path(src).read_bytes()
    proc = run("resize_lora.py", "--model", src, "--new_rank", "2", "--save_to", src, "--overwrite", "--device", "cpu")
    assert proc.returncode == 2 and "input" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert Path(src).read_bytes() == before


def test_nan_in_input_is_named(tmp_path):
    path = tmp_path / "nan.safetensors"
    down = torch.randn(4, 640)
    down[0, 0] = float("nan")
    save_file({f"{MODULE}.lora_down.weight": down, f"{MODULE}.lora_up.weight": torch.randn(640, 4),
               f"{MODULE}.alpha": torch.tensor(2.0)}, str(path))
    out = tmp_path / "out.safetensors"
    proc = run("convert_lora.py", str(path), str(out), "--to", "diffusers", "--family", "sdxl")
    assert "NaN" in proc.stderr and MODULE in proc.stderr


def test_shard_of_sharded_input_is_never_replaced(tmp_path):
    """--save_to equal to one shard of a sharded --sd_model (folder or index), even with --overwrite."""
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(folder / "m-00001-of-00002.safetensors"))
    save_file({"model.diffusion_model.out.0.bias": torch.zeros(4)}, str(folder / "m-00002-of-00002.safetensors"))
    index = {"weight_map": {"model.diffusion_model.out.2.bias": "m-00001-of-00002.safetensors",
                            "model.diffusion_model.out.0.bias": "m-00002-of-00002.safetensors"}}
    (folder / "m.safetensors.index.json").write_text(json.dumps(index))
    lora = good_lora(tmp_path / "lora.safetensors")
    before = {p: sha256(p) for p in [*folder.iterdir(), Path(lora)]}
    shard = str(folder / "m-00002-of-00002.safetensors")
    for sd_model in (str(folder), str(folder / "m.safetensors.index.json")):
        proc = run("merge_lora.py", "--sd_model", sd_model, "--models", lora, "--save_to", shard, "--overwrite",
                   "--device", "cpu")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "one of the inputs" in lines[0] and shard in lines[0]
    assert {p: sha256(p) for p in before} == before
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


@pytest.mark.parametrize("argv,needle", [
    (["--to", "kohyaa"], "--to: value 'kohyaa' is not allowed; use one of "),
    (["--to", "kohya", "--family", "sd9"], "--family: value 'sd9' is not allowed; use one of "),
    ([], "--to: required but not given"),
])
def test_bad_flags_are_one_line(tmp_path, argv, needle):
    src = good_lora(tmp_path / "lora.safetensors")
    proc = run("convert_lora.py", src, str(tmp_path / "o.safetensors"), *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("convert_lora.py: error: ")
    assert needle in lines[0], lines[0]
    assert os.listdir(tmp_path) == ["lora.safetensors"]
