"""What the README promises to notebook users and quickstart readers: library.cli.parse_args reads --config_file
(a parser's own parse_args does not), and the quickstart's example LoRAs load in diffusers."""

import os
import re

import pytest
import torch

import merge_lora
import quickstart
from library.cli import parse_args
from tests.helpers import ROOT


def test_readme_python_snippet_uses_the_call_that_reads_config_files(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    snippet = re.search(r"Every script can also be driven from Python.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "parse_args(merge_lora.setup_parser()" in snippet and "from library.cli import parse_args" in snippet
    config = tmp_path / "merge.toml"
    config.write_text('ratios = [0.5, 0.25]\nmode = "add"\n', encoding="utf-8")
    argv = ["--models", "a.safetensors", "b.safetensors", "--save_to", "o.safetensors", "--config_file", str(config)]
    args = parse_args(merge_lora.setup_parser(), argv)
    assert args.ratios == [0.5, 0.25] and args.mode == "add"
    plain = merge_lora.setup_parser().parse_args(argv)  # what the README used to show: the file is ignored
    assert plain.ratios is None and plain.mode is None
    assert parse_args(merge_lora.setup_parser(), [*argv, "--ratios", "1", "1"]).ratios == [1.0, 1.0]  # flags win


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def test_quickstart_example_loras_load_in_diffusers(tmp_path):
    """Real SDXL/CLIP configs built on the meta device (no weights): diffusers' kohya conversion, then PEFT
    injection into the real module tree, which checks every name and shape."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    quickstart.make_example_lora(str(tmp_path / "style_a.safetensors"), rank=8, alpha=4.0, seed=1)
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name="style_a.safetensors",
                                                              unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="qs")
    for te, prefix in ((te1, "text_encoder"), (te2, "text_encoder_2")):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te, prefix=prefix,
                                                              adapter_name="qs")
    loaded = [sum(name.endswith("lora_A.qs") for name, _ in m.named_modules()) for m in (unet, te1, te2)]
    expected = [sum(name.startswith(p) for name in quickstart.EXAMPLE_MODULES) for p in ("lora_unet", "lora_te1", "lora_te2")]
    assert loaded == expected == [24, 6, 6]
    # and diffusers' converter keeps our factors and alpha
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    from library.safetensors_io import load_tensors

    ours, _ = load_tensors(str(tmp_path / "style_a.safetensors"))
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight"
    assert torch.equal(state[key], ours[f"{name}.lora_down.weight"])
    assert tuple(ours[f"{name}.lora_up.weight"].shape) == (640, 8) and tuple(state[key].shape) == (8, 2048)
