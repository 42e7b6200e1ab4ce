"""A LoRA of one family given to another family's checkpoint is a clear error naming both (issue 16), in
merge_lora.py (the checkpoint's family given with --family, as thinned test checkpoints need), flux_merge_lora.py
(FLUX.1 checkpoints only) and wan22_merge_lora.py (Wan 2.2 A14B experts); nothing is written.

LoRAs and checkpoints are small, with real key names and shapes of each family.
"""

from __future__ import annotations

import pytest
import torch

import flux_merge_lora
import merge_lora
import wan22_merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES
from library.formats.variants import applies_to
from library.safetensors_io import save_tensors
from tests.helpers import run_script

H = 3072
LORA_MODULES = {  # (key prefix, suffixes) -> shapes; kohya for most, PEFT for Qwen-Image
    "wan21": {"lora_unet_head_head": (64, 5120), "lora_unet_time_embedding_0": (5120, 256)},
    "flux1": {"lora_unet_final_layer_linear": (64, H), "lora_unet_double_blocks_0_img_mod_lin": (6 * H, H),
              "lora_unet_single_blocks_0_modulation_lin": (3 * H, H)},
    "chroma": {"lora_unet_final_layer_linear": (64, H), "lora_unet_distilled_guidance_layer_in_proj": (5120, 64)},
    "qwen_image": {"transformer.img_in": (H, 64), "transformer.proj_out": (64, H), "transformer.txt_in": (H, 3584)},
    "sdxl": {"lora_unet_input_blocks_4_1_proj_in": (640, 640),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280)},
}
CHECKPOINTS = {
    "wan21": {"head.head.weight": (64, 5120), "head.head.bias": (64,), "time_embedding.0.weight": (5120, 256),
              "blocks.0.norm3.weight": (5120,)},
    "flux1": {"final_layer.linear.weight": (64, H), "img_in.weight": (H, 64), "time_in.in_layer.weight": (H, 256),
              "guidance_in.in_layer.weight": (H, 256), "double_blocks.0.img_attn.norm.query_norm.scale": (128,)},
    "chroma": {"final_layer.linear.weight": (64, H), "img_in.weight": (H, 64),
               "distilled_guidance_layer.in_proj.weight": (5120, 64),
               "double_blocks.0.img_attn.norm.query_norm.scale": (128,)},
    "qwen_image": {"img_in.weight": (H, 64), "proj_out.weight": (64, H), "txt_in.weight": (H, 3584),
                   "time_text_embed.timestep_embedder.linear_1.weight": (H, 256), "txt_norm.weight": (3584,)},
    "sdxl": {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
             "conditioner.embedders.1.model.ln_final.weight": (1280,)},
}
PAIRS = [(lf, cf) for lf in LORA_MODULES for cf in CHECKPOINTS if not applies_to(lf, cf)]


def lora(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(family))
    out = {}
    for name, (o, i) in LORA_MODULES[family].items():
        a, b = torch.randn(2, i, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1
        if name.startswith("transformer."):
            out.update({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b})
        else:
            out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": torch.tensor(1.0)})
    return out


def names(message: str, family: str) -> bool:
    """Does the message name the family (its id, or the description loratools prints)?"""
    return family in message or FAMILIES[family].description in message


@pytest.fixture
def files(tmp_path):
    def make(lf: str, cf: str):
        save_tensors(tmp_path / f"{lf}_lora.safetensors", lora(lf))
        g = torch.Generator().manual_seed(1)
        save_tensors(tmp_path / f"{cf}_model.safetensors",
                     {k: torch.randn(s, generator=g) for k, s in CHECKPOINTS[cf].items()})
        return tmp_path / f"{lf}_lora.safetensors", tmp_path / f"{cf}_model.safetensors", tmp_path / "out.safetensors"
    return make


@pytest.mark.parametrize(("lf", "cf"), PAIRS)
def test_merge_lora_names_both_families(files, lf, cf):
    path, ckpt, out = files(lf, cf)
    with pytest.raises(LoraToolsError) as info:
        run_script(merge_lora, ["--sd_model", ckpt, "--models", path, "--family", cf, "--save_to", out])
    assert names(str(info.value), lf) and names(str(info.value), cf), str(info.value)
    assert not out.exists()


@pytest.mark.parametrize(("lf", "cf"), [(lf, cf) for lf, cf in PAIRS if lf in ("flux1", "chroma") or
                                        cf in ("flux1", "chroma")])
def test_flux_merge_lora_names_both_families(files, lf, cf):
    """The FLUX.1 tool: a LoRA of another family is named against FLUX.1; a FLUX.1 LoRA given a checkpoint with
    no FLUX.1 weight is told the checkpoint is no FLUX.1 checkpoint."""
    path, ckpt, out = files(lf, cf)
    with pytest.raises(LoraToolsError) as info:
        run_script(flux_merge_lora, ["--flux_model", ckpt, "--models", path, "--save_to", out])
    message = str(info.value)
    assert names(message, lf) or "FLUX.1" in message, message
    assert names(message, cf) or "not a FLUX.1" in message or "not FLUX.1" in message, message
    assert not out.exists()


@pytest.mark.parametrize("lf", [f for f in LORA_MODULES if f != "wan21"])
@pytest.mark.parametrize("flag", ["--high_noise", "--models"])
def test_wan22_merge_lora_names_both_families(files, lf, flag):
    path, ckpt, out = files(lf, "wan21")
    with pytest.raises(LoraToolsError) as info:
        run_script(wan22_merge_lora, ["--high_noise_model", ckpt, "--low_noise_model", ckpt, flag, path,
                                      "--save_to", out])
    assert names(str(info.value), lf) and "Wan 2.2 A14B" in str(info.value), str(info.value)
    assert not list(out.parent.glob("out*"))
