"""convert_lora.py end to end: files on disk, printed summary, metadata, errors with exit status 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

import convert_lora
from library.formats import read_lora
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import SHARED_DATA, ai_toolkit_single_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORAS = os.path.join(SHARED_DATA, "real-loras")


def run(argv, capsys):
    code = convert_lora.run_cli(convert_lora.setup_parser, convert_lora.main, argv)
    return code, capsys.readouterr()


def test_ai_toolkit_flux_file_to_kohya(tmp_path, capsys):
    src, dst = tmp_path / "aitk.safetensors", tmp_path / "kohya.safetensors"
    save_tensors(src, ai_toolkit_single_block(0), {"ss_output_name": "mine"})
    code, out = run([str(src), str(dst), "--to", "kohya"], capsys)
    assert code == 0
    assert "flux1" in out.out and "4 modules" in out.out and "lora_unet_single_blocks_0_linear1" in out.out
    tensors, meta = load_tensors(dst)
    assert sorted(tensors) == ["lora_unet_single_blocks_0_linear1." + s for s in ("alpha", "lora_down.weight",
                                                                                   "lora_up.weight")]
    assert meta["ss_output_name"] == "mine"  # input metadata kept
    assert json.loads(meta["loratools.inputs"])  # provenance recorded


def test_peft_output_carries_alpha_in_adapter_metadata(tmp_path, capsys):
    src, dst = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_tensors(src, {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 3072),
                       "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 4),
                       "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(2.0)})
    code, _ = run([str(src), str(dst), "--to", "diffusers", "--save_precision", "bf16"], capsys)
    assert code == 0
    tensors, meta = load_tensors(dst)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == 2.0 and config["transformer.r"] == 4
    module = read_lora(dst).modules[0]
    assert float(module.tensors["alpha"]) == 2.0


@pytest.mark.skipif(not os.path.isdir(LORAS), reason="real files not found")
def test_malformed_file_exits_2_with_one_line(tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    code = None
    with pytest.raises(SystemExit) as info:
        run([os.path.join(LORAS, "timohavdk_sd-lora__new.safetensors"), str(dst), "--to", "kohya"], capsys)
    code = info.value.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "adapter suffix" in err
    assert not dst.exists()


def test_unmatched_keys_fail_unless_allowed(tmp_path, capsys):
    src, dst = tmp_path / "k.safetensors", tmp_path / "out.safetensors"
    t = ai_toolkit_single_block(1, parts=("attn.to_q",))
    t["transformer.not_a_module.lora_A.weight"] = torch.randn(2, 8)
    t["transformer.not_a_module.lora_B.weight"] = torch.randn(8, 2)
    save_tensors(src, t)
    with pytest.raises(SystemExit):
        run([str(src), str(dst), "--to", "comfy"], capsys)
    assert "transformer.not_a_module.lora_A.weight" in capsys.readouterr().err and not dst.exists()
    code, out = run([str(src), str(dst), "--to", "comfy", "--allow_unmatched"], capsys)
    assert code == 0 and "dropped 2 key(s)" in out.err
    assert sorted(load_tensors(dst)[0]) == ["diffusion_model.single_blocks.1.linear1." + s
                                            for s in ("alpha", "lora_down.weight", "lora_up.weight")]


def test_ambiguous_family_asks_for_family(tmp_path, capsys):
    # attn1 only: SD1 and SD2 have the same names and shapes there.
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_tensors(src, {f"{name}.lora_down.weight": torch.randn(2, 320), f"{name}.lora_up.weight": torch.randn(320, 2)})
    with pytest.raises(SystemExit):
        run([str(src), str(dst), "--to", "diffusers"], capsys)
    assert "--family" in capsys.readouterr().err
    code, _ = run([str(src), str(dst), "--to", "diffusers", "--family", "sd2"], capsys)
    assert code == 0 and read_lora(dst, family="sd2").family == "sd2"


def test_split_qkv_alpha_is_reported_and_fixed_on_request(tmp_path, capsys):
    downs, ups = torch.randn(6, 3072), torch.block_diag(*[torch.randn(3072, 2) for _ in range(3)])
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    src = tmp_path / "s.safetensors"
    save_tensors(src, {f"{name}.lora_down.weight": downs, f"{name}.lora_up.weight": ups,
                       f"{name}.alpha": torch.tensor(1.0)}, {"ss_network_args": json.dumps({"split_qkv": "True"})})
    code, out = run([str(src), str(tmp_path / "a.safetensors"), "--to", "kohya"], capsys)
    assert "sd-scripts#2204" in out.err
    assert float(load_tensors(tmp_path / "a.safetensors")[0][f"{name}.alpha"]) == 1.0
    code, out = run([str(src), str(tmp_path / "b.safetensors"), "--to", "kohya", "--fix_split_qkv_alpha"], capsys)
    assert float(load_tensors(tmp_path / "b.safetensors")[0][f"{name}.alpha"]) == 3.0


def test_dry_run_writes_nothing(tmp_path, capsys):
    src, dst = tmp_path / "aitk.safetensors", tmp_path / "out.safetensors"
    save_tensors(src, ai_toolkit_single_block(2))
    code, out = run([str(src), str(dst), "--to", "comfy", "--dry_run"], capsys)
    assert code == 0 and "dry run" in out.out and not dst.exists()
