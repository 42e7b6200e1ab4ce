"""library.inputs: ratios, the typed family fallback for ambiguous files, one LoraInput per file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.errors import AmbiguousFamilyError, LoraToolsError
from library.formats import read_lora
from library.inputs import lora_inputs, ratios_for, read_loras

AMBIGUOUS = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1 = SD2 here
SD2_ONLY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 1024 wide: OpenCLIP-H, SD2


def write(path, name, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    save_file({f"{name}.lora_down.weight": torch.randn(2, width, generator=g),
               f"{name}.lora_up.weight": torch.randn(width, 2, generator=g),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    return str(path)


def test_ratios_default_to_one_and_counts_are_checked():
    assert ratios_for(None, ["a", "b"]) == [1.0, 1.0]
    assert ratios_for([0.5, -1], ["a", "b"]) == [0.5, -1.0]
    with pytest.raises(LoraToolsError, match="--ratios has 1 values but 2 models"):
        ratios_for([1], ["a", "b"])
    with pytest.raises(LoraToolsError, match="--ratios has 0 values"):
        ratios_for([], ["a"])


def test_ambiguity_is_a_typed_error(tmp_path):
    path = write(tmp_path / "a.safetensors", AMBIGUOUS, 320)
    with pytest.raises(AmbiguousFamilyError):
        read_lora(path)
    with pytest.raises(AmbiguousFamilyError):
        read_loras([path])  # nothing to fall back on


def test_ambiguous_file_takes_the_family_of_the_others_or_the_given_one(tmp_path):
    amb = write(tmp_path / "a.safetensors", AMBIGUOUS, 320)
    sd2 = write(tmp_path / "b.safetensors", SD2_ONLY, 1024, seed=1)
    assert [lora.family for lora in read_loras([amb, sd2])] == ["sd2", "sd2"]
    assert [lora.family for lora in read_loras([amb], family="sd1")] == ["sd1"]
    with pytest.raises(LoraToolsError, match="not for sdxl, the family of the checkpoint"):
        read_loras([amb], family="sdxl", family_from="checkpoint")


def test_lora_inputs_pair_files_with_ratios_and_block_weights(tmp_path):
    a = write(tmp_path / "a.safetensors", AMBIGUOUS, 320)
    b = write(tmp_path / "b.safetensors", AMBIGUOUS, 320, seed=2)
    inputs = lora_inputs([a, b], [0.5, 2], None, family="sd1")
    assert [(i.path, i.ratio, i.block_weights, i.lora.family) for i in inputs] == [
        (a, 0.5, None, "sd1"), (b, 2.0, None, "sd1")]
    seen = []
    custom = lora_inputs([a], None, reader=lambda p: seen.append(p) or read_lora(p, family="sd2"))
    assert seen == [a] and custom[0].ratio == 1.0 and custom[0].lora.family == "sd2"
