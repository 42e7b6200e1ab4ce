"""Outside oracle: PEFT merging its own LoRA into a CLIP-L-wide text encoder (transformers) must give the
weights merge_lora.py writes into the SD1 checkpoint holding that encoder."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_lora
from library.cli import parse_args

PREFIX = "cond_stage_model.transformer.text_model."


def test_peft_merge_of_a_clip_lora_matches(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                         num_attention_heads=12, vocab_size=100, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.CLIPTextModel(config).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rank, alpha, ratio = 4, 2.0, 0.7
    lora_config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "fc1"])
    model = peft.inject_adapter_in_model(lora_config, model)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)  # PEFT starts B at zero
    adapter = peft.get_peft_model_state_dict(model)
    # a diffusers-format LoRA file: component prefix, PEFT key names, alpha in lora_adapter_metadata
    lora = {f"text_encoder.{k}": v.contiguous() for k, v in adapter.items()}
    meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": rank, "text_encoder.lora_alpha": alpha})}
    save_file(lora, str(tmp_path / "peft_lora.safetensors"), metadata=meta)
    # the same encoder as an SD1 checkpoint's cond_stage_model (HF layout under a prefix)
    save_file({PREFIX + k.removeprefix("text_model."): v for k, v in base.items()}, str(tmp_path / "base.safetensors"))

    # PEFT's own merge at strength `ratio`
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", ratio)
            module.merge()
    oracle = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}

    out = tmp_path / "merged.safetensors"
    merge_lora.main(parse_args(merge_lora.setup_parser(), [
        "--sd_model", str(tmp_path / "base.safetensors"), "--models", str(tmp_path / "peft_lora.safetensors"),
        "--ratios", str(ratio), "--save_to", str(out), "--family", "sd1"]))
    merged = load_file(str(out))
    changed = 0
    for key, value in oracle.items():
        ours = merged[PREFIX + key.removeprefix("text_model.")]
        assert torch.allclose(ours, value, atol=1e-6), key
        changed += not torch.equal(value, base[key])
    assert changed == 2 * 3  # q_proj, v_proj, fc1 in both layers
