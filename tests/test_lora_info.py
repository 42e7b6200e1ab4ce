"""lora_info.py: opens every real file, reports ranks/alphas/metadata, explains the malformed one."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lora_info
from library.errors import LoraToolsError
from library.safetensors_io import save_tensors
from tests.helpers import ROOT

REAL = {
    "LyCORIS__smart_falcon_4_lokr.safetensors": ("sd1", "lokr"),
    "catundchat_sd15-lora__pytorch_lora_weights.safetensors": ("sd1", "lora"),
    "timohavdk_sd-lora__2100-lora.safetensors": ("sd1", "lora"),
}
MALFORMED = "timohavdk_sd-lora__new.safetensors"


def run_info(*argv):
    args = lora_info.setup_parser().parse_args(list(argv))
    return lora_info.main(args)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files(shared_data, name, capsys):
    family, kind = REAL[name]
    report = run_info(os.path.join(shared_data, "real-loras", name), "--json")[0]
    assert report["family"] == family
    assert set(report["types"]) == {kind}
    assert report["modules"] > 0 and not report["unmatched_keys"]
    json.loads(capsys.readouterr().out)


def test_lokr_real_file_training_metadata(shared_data):
    report = run_info(os.path.join(shared_data, "real-loras", "LyCORIS__smart_falcon_4_lokr.safetensors"))[0]
    assert report["training"]["ss_network_module"] == "lycoris.kohya"
    assert report["top_tags"], "ss_tag_frequency should give top tags"


def test_malformed_real_file_is_explained(shared_data):
    path = os.path.join(shared_data, "real-loras", MALFORMED)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "lora_info.py"), path], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert "could not interpret this file" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and MALFORMED in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kohya_fixture_rank_summary(tmp_path):
    torch.manual_seed(0)
    tensors = {}
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"]
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn(8, 640)
        tensors[f"{name}.lora_up.weight"] = torch.randn(640, 8)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "x.safetensors"
    save_tensors(path, tensors, {"ss_network_dim": "8"})
    report = run_info(str(path), "--family", "sdxl")[0]
    assert report["modules"] == 2
    assert report["rank_summary"] == "rank 8, alpha 4 everywhere"
    assert all(m["scale"] == 0.5 for m in report["module_list"])


def test_not_a_lora(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello")
    with pytest.raises(LoraToolsError, match="notes.safetensors"):
        run_info(str(path))
