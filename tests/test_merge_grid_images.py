"""merge_grid.py's image path on a tiny randomly initialised Stable Diffusion pipeline built here from configs
(no download): a one-block UNet whose first down block has SD1.5's real widths (320, cross-attention 768), so
SD1 LoRAs with real key names and shapes land on it; a one-layer CLIP text model of width 768; a tiny VAE;
a CLIP tokenizer made from a small vocabulary written here. The pipeline is loaded once and each cell's
deltas are swapped in and out: the contact sheet has one labelled cell per grid cell, different deltas give
different images, and the weights come back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import kohya_metadata, kohya_modules, make_lora, run_script, write_lora

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = "lora_unet_down_blocks_0_attentions_0_"
TARGETS = [BLOCK + "proj_in", BLOCK + "transformer_blocks_0_attn1_to_q", BLOCK + "transformer_blocks_0_attn2_to_k",
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]


def tiny_pipeline(folder) -> str:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: words tokenize letter by letter
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "pipe"))
    return str(folder / "pipe")


def test_one_image_per_cell_from_one_loaded_pipeline_and_a_labelled_sheet(tmp_path, monkeypatch):
    import matplotlib.image

    import library.grid.images as images
    import merge_grid

    base = tiny_pipeline(tmp_path)
    modules = make_modules(kohya_modules("sd1"))
    # alpha = 40·rank: deltas large enough to move a random UNet's 16-pixel image by whole 8-bit steps
    paths = [write_lora(str(tmp_path / f"{n}.safetensors"), make_lora(modules, 4, alpha=160, seed=s,
                        dtype=torch.float32), kohya_metadata("sd1", 4, 160)) for n, s in (("a", 1), ("b", 2))]
    loads = []
    real_load = images.load_pipeline
    monkeypatch.setattr(images, "load_pipeline", lambda *a: loads.append(a) or real_load(*a))
    out = tmp_path / "out"
    result = run_script(merge_grid, ["--models", *paths, "--x", "ratio_a=0.5,1", "--y", "ratio_b=0,1",
                                     "--new_rank", "8", "--base_model", base, "--prompts", "a cat", "--steps", "2",
                                     "--size", "16", "--guidance", "1", "--seed", "3", "--device", "cpu",
                                     "--save_to", str(out)])
    assert len(loads) == 1  # the base pipeline is loaded once for the whole sweep
    labels = [r["label"] for r in result["rows"]]
    assert result["sheet_titles"] == labels and len(labels) == 4
    pictures = [matplotlib.image.imread(out / r["image"]) for r in result["rows"]]
    assert all(p.shape[:2] == (16, 16) for p in pictures)
    for i in range(4):
        for j in range(i + 1, 4):
            assert float(abs(pictures[i] - pictures[j]).max()) > 0, (labels[i], labels[j])
    sheet = matplotlib.image.imread(out / "sheet.png")
    assert (out / "sheet.png").stat().st_size > 5_000 and sheet.shape[0] > 200 and sheet.shape[1] > 200


def make_modules(shapes):
    from tests.helpers import LoraModule

    return [LoraModule(name, shapes[name]) for name in TARGETS]


def test_deltas_are_added_in_place_and_the_weights_restored_exactly(tmp_path):
    from library.formats import Module, Target
    from library.grid.images import DeltaSwapper, load_pipeline

    pipe = load_pipeline(tiny_pipeline(tmp_path), torch.device("cpu"))
    weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    before = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 320, generator=gen), torch.randn(320, 2, generator=gen)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    module = Module(Target(key, None, "unet", (320, 320)),
                    {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0)}, "test")
    swapper = DeltaSwapper(pipe, "sd1")
    with swapper.applied([module]):
        expected = before.double() + (1.0 / 2) * up.double() @ down.double()
        assert torch.allclose(weight.double(), expected, atol=1e-5)
    assert torch.equal(weight, before)
