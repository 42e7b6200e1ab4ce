"""Kohya SD/SDXL files with per-layer alphas load in diffusers with wrong scales (its alpha_pattern bug):
lora_info and convert_lora say so and point to `convert_lora.py --to diffusers`, whose file diffusers loads
with every module's own scale."""

import pytest
import torch

import convert_lora
import lora_info
from library.diffusers_compat import kohya_alpha_warning
from tests.helpers import LoraModule, kohya_metadata, make_lora, run_script, write_lora

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
OUT = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"
MODULES = [LoraModule(Q, (640, 640)), LoraModule(K, (640, 2048)), LoraModule(OUT, (640, 640))]


def _per_layer_file(path):
    """A dynamic-resize-like file: ranks 8, 4, 8 with alpha = rank/2 each (alphas 4, 2, 4)."""
    tensors = make_lora(MODULES, 8, ranks={K: 4}, dtype=torch.float32)
    for name, alpha in ((Q, 4.0), (K, 2.0), (OUT, 4.0)):
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    write_lora(str(path), tensors, kohya_metadata("sdxl", 8, 4.0))
    return path


def test_rule():
    assert kohya_alpha_warning("kohya", "sdxl", [(8, 4.0), (4, 2.0), (8, 4.0)]).count("1 of 3 modules") == 1
    assert kohya_alpha_warning("kohya", "sdxl", [(8, 4.0), (4, 4.0)]) is None  # one alpha: diffusers is right
    assert kohya_alpha_warning("kohya", "sdxl", [(8, None), (8, 8.0)]) is None  # absent alpha = rank
    assert kohya_alpha_warning("diffusers", "sdxl", [(8, 4.0), (4, 2.0)]) is None
    assert kohya_alpha_warning("kohya", "flux1", [(8, 4.0), (4, 2.0)]) is None  # another converter


def test_lora_info_and_convert_lora_warn(tmp_path, capsys):
    src = _per_layer_file(tmp_path / "dyn.safetensors")
    reports = run_script(lora_info, [src])
    err = capsys.readouterr().err
    assert "wrong scale" in err and "convert_lora.py --to diffusers" in err
    assert reports[0]["warnings"] and "1 of 3 modules" in reports[0]["warnings"][0]
    run_script(convert_lora, [src, tmp_path / "k.safetensors", "--to", "kohya"])
    assert "convert_lora.py --to diffusers" in capsys.readouterr().err
    run_script(convert_lora, [src, tmp_path / "d.safetensors", "--to", "diffusers"])
    assert "wrong scale" not in capsys.readouterr().err


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
DIFFUSERS_OF = {Q: "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                K: "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                OUT: "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"}


def _diffusers_scales(folder, name):
    """The scale diffusers' PEFT layers apply per module, after its own loading path (real SDXL config, meta)."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(folder), weight_name=name, unet_config=unet.config, return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="t", metadata=metadata)
    modules = dict(unet.named_modules())
    return {k: float(modules[path].scaling["t"]) for k, path in DIFFUSERS_OF.items()}


def test_the_bug_and_the_fix_in_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    _per_layer_file(tmp_path / "dyn.safetensors")
    run_script(convert_lora, [tmp_path / "dyn.safetensors", tmp_path / "peft.safetensors", "--to", "diffusers"])
    right = {Q: 4 / 8, K: 2 / 4, OUT: 4 / 8}  # alpha / rank of each module
    kohya = _diffusers_scales(tmp_path, "dyn.safetensors")
    assert kohya[K] != pytest.approx(right[K])  # the bug this warning is about (4/4 instead of 2/4)
    assert _diffusers_scales(tmp_path, "peft.safetensors") == pytest.approx(right)
