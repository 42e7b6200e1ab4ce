"""cloneofsimo/lora (`lora_diffusion`) safetensors files: `<model>:<i>:up/down`, no names, read by rebuilding the
order in which lora_diffusion's `_find_modules` meets the layers (checked here against diffusers' and
transformers' own module trees), then as any SD1.x kohya LoRA."""

import json
import math

import pytest
import torch

import convert_lora
from library.formats import read_lora
from library.formats.cloneofsimo import text_encoder_order, unet_order
from library.safetensors_io import save_tensors
from tests.helpers import dense_delta, run_script

WIDTH = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "up_blocks.1": 1280, "up_blocks.2": 640,
         "up_blocks.3": 320, "mid_block": 1280}


def _find_modules_order(model, ancestors):
    """lora_diffusion's `_find_modules` walk, written out: every module whose class is a target ancestor, in
    model.modules() order, then each of its Linear children in named_modules() order."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for ancestor in model.modules():
        if type(ancestor).__name__ in ancestors:
            found += [f"{names[id(ancestor)]}.{n}" for n, m in ancestor.named_modules() if isinstance(m, torch.nn.Linear)]
    return found


def test_layer_order_matches_diffusers_and_transformers_module_trees():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet = diffusers.UNet2DConditionModel(  # SD1.x's block structure, tiny widths
        sample_size=8, block_out_channels=(8, 16, 32, 32), layers_per_block=2, cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4)
    for geglu, targets in ((False, ("CrossAttention", "Attention")), (True, ("CrossAttention", "Attention", "GEGLU"))):
        assert _find_modules_order(unet, targets) == unet_order(geglu)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                                               num_attention_heads=2))
    # the order is what matters; transformers 5 drops the `text_model.` level from the module names
    ours = [p.removeprefix("text_model.") for p in text_encoder_order(3)]
    assert [p.removeprefix("text_model.") for p in _find_modules_order(te, ("CLIPAttention",))] == ours


def _shape(path: str) -> tuple[int, int]:
    dim = next(w for prefix, w in WIDTH.items() if path.startswith(prefix))
    if path.endswith("ff.net.0.proj"):
        return 8 * dim, dim
    if ".attn2.to_k" in path or ".attn2.to_v" in path:
        return dim, 768
    return dim, dim


def _cloneofsimo_file(path, rank=4, geglu=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors, meta = {}, {}
    targets = ["CrossAttention", "Attention", "GEGLU"] if geglu else ["CrossAttention", "Attention"]
    orders = {"unet": (unet_order(geglu), _shape), "text_encoder": (text_encoder_order(12), lambda p: (768, 768))}
    for model, (order, shape_of) in orders.items():
        meta[model] = json.dumps(targets if model == "unet" else ["CLIPAttention"])
        for i, module in enumerate(order):
            out_dim, in_dim = shape_of(module)
            tensors[f"{model}:{i}:up"] = torch.randn(out_dim, rank, generator=g) * 0.1
            tensors[f"{model}:{i}:down"] = torch.randn(rank, in_dim, generator=g) / math.sqrt(in_dim)
            meta[f"{model}:{i}:rank"] = str(rank)
    save_tensors(str(path), tensors, meta)
    return tensors


@pytest.mark.parametrize("geglu", [True, False])
def test_read_as_an_sd1_lora_with_the_stored_delta(tmp_path, geglu):
    raw = _cloneofsimo_file(tmp_path / "c.safetensors", geglu=geglu)
    lora = read_lora(tmp_path / "c.safetensors")
    assert lora.family == "sd1" and lora.format == "cloneofsimo"
    assert len(lora.modules) == (144 if geglu else 128) + 48
    by_source = {m.source: m for m in lora.modules}
    i = unet_order(geglu).index("up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k")
    module = by_source["lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k"]
    expected = raw[f"unet:{i}:up"].double() @ raw[f"unet:{i}:down"].double()  # scale 1: no alpha in these files
    assert torch.allclose(dense_delta({f"x.{k}": v for k, v in module.tensors.items()}, "x"), expected, atol=1e-6)
    j = text_encoder_order(12).index("text_model.encoder.layers.5.self_attn.q_proj")
    te = by_source["lora_te_text_model_encoder_layers_5_self_attn_q_proj"]
    assert torch.equal(te.tensors["lora_up.weight"], raw[f"text_encoder:{j}:up"])


def test_convert_to_kohya_and_a_wrong_count_is_refused(tmp_path):
    _cloneofsimo_file(tmp_path / "c.safetensors")
    run_script(convert_lora, [tmp_path / "c.safetensors", tmp_path / "k.safetensors", "--to", "kohya"])
    assert read_lora(tmp_path / "k.safetensors").format == "kohya"
    tensors = {"unet:0:up": torch.zeros(320, 4), "unet:0:down": torch.zeros(4, 320)}
    save_tensors(str(tmp_path / "bad.safetensors"), tensors)
    from library.errors import LoraToolsError

    with pytest.raises(LoraToolsError, match="layer order cannot be rebuilt"):
        read_lora(tmp_path / "bad.safetensors")
