"""DoRA magnitudes across formats: LyCORIS `dora_scale` (either axis) and PEFT `lora_magnitude_vector` ([out])."""

from __future__ import annotations

import pytest
import torch

from library.errors import LoraToolsError
from library.formats import lora_from_tensors, lora_tensors

NAME = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1, 640×640
PEFT = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def kohya(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{NAME}.lora_down.weight": torch.randn(4, 640), f"{NAME}.lora_up.weight": torch.randn(640, 4),
            f"{NAME}.alpha": torch.tensor(2.0), f"{NAME}.dora_scale": scale,
            # attn2 to_k with 768 inputs makes the file unambiguously SD1
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 768),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0)}


def test_output_axis_dora_becomes_peft_magnitude_and_back():
    scale = torch.rand(640, 1) + 0.5
    t = kohya(scale)
    lora = lora_from_tensors(t)
    module = next(m for m in lora.modules if m.source == NAME)
    assert module.dora_axis == "out"
    out, meta = lora_tensors(lora.modules, "sd1", "diffusers")
    assert out[f"{PEFT}.lora_magnitude_vector"].equal(scale.reshape(-1))
    back, _ = lora_tensors(lora_from_tensors(out, meta).modules, "sd1", "kohya")
    assert sorted(back) == sorted(t) and all(back[k].equal(v) for k, v in t.items())


def test_ai_toolkit_magnitude_is_read_as_output_axis():
    t = {f"{PEFT}.lora_A.weight": torch.randn(4, 640), f"{PEFT}.lora_B.weight": torch.randn(640, 4),
         f"{PEFT}.magnitude": torch.rand(640)}
    module = lora_from_tensors(t, family="sd1").modules[0]
    assert module.dora_axis == "out" and module.tensors["dora_scale"].shape == (640, 1)


def test_input_axis_dora_stays_in_kohya_and_is_refused_by_peft():
    t = kohya(torch.rand(1, 640) + 0.5)
    lora = lora_from_tensors(t)
    assert next(m for m in lora.modules if m.source == NAME).dora_axis == "in"
    comfy, meta = lora_tensors(lora.modules, "sd1", "comfy")
    assert comfy["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.dora_scale"].shape == (1, 640)
    with pytest.raises(LoraToolsError, match="per-output-row"):
        lora_tensors(lora.modules, "sd1", "diffusers")
