"""HiDream-I1/E1 (issue 16): its table against diffusers' own HiDreamImageTransformer2DModel (meta device), round
trips through every format with the mixture-of-experts names, diffusers' converter as oracle, SimpleTuner's
`lycoris_`/`transformer.` files, a tiny HiDream transformer that loads our diffusers output through
`load_lora_into_transformer`, a merge into a thinned checkpoint against float64, and a foreign LoRA refused."""

from __future__ import annotations

import re

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, Module, Target, lora_from_tensors, lora_tensors
from library.lora_output import write_lora
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_peft_loaded_and_fused,
    assert_round_trips,
    assert_same_deltas,
    diffusers_fixture,
    probe_deltas,
    run_script,
)

D = 2560
I1_CONFIG = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "caption_channels": [4096, 4096],
             "llama_layers": list(range(48))}


def hidream_weights() -> dict[str, tuple[int, ...]]:
    """Every 2-D weight of diffusers' HiDream-I1 transformer (Linears and the MoE router), by module path."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.HiDreamImageTransformer2DModel(**I1_CONFIG)
    return {n[: -len(".weight")]: tuple(p.shape) for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2}


def thinned(blocks=(0, 15), singles=(0, 31), experts=True) -> dict[str, tuple[int, ...]]:
    """diffusers names of a thinned HiDream LoRA: two double and two single blocks (every expert), the top level."""
    out = {}
    for path, shape in hidream_weights().items():
        m = re.match(r"(double|single)_stream_blocks\.(\d+)\.", path)
        if m and int(m[2]) not in (blocks if m[1] == "double" else singles):
            continue
        if not experts and ".experts." in path:
            continue
        if path.startswith("caption_projection.") and path not in ("caption_projection.0.linear", "caption_projection.48.linear"):
            continue
        out["transformer." + path] = shape
    return out


def test_table_is_diffusers_own_model():
    weights = hidream_weights()
    table = FAMILIES["hidream"].table
    assert {p: table.shapes[s.key] for p, s in table.slots["diffusers"].items()} == weights
    assert table.slots["hidream"].keys() == table.slots["diffusers"].keys()  # the original names are diffusers'
    assert table.shapes["double_stream_blocks.15.block.ff_i.experts.3.w2.weight"] == (D, 6912)
    assert table.shapes["single_stream_blocks.31.block.ff_i.shared_experts.w1.weight"] == (3584, D)
    assert table.shapes["double_stream_blocks.0.block.ff_i.gate.weight"] == (4, D)
    assert table.shapes["double_stream_blocks.0.block.adaLN_modulation.1.weight"] == (12 * D, D)
    assert table.shapes["single_stream_blocks.0.block.adaLN_modulation.1.weight"] == (6 * D, D)
    assert "single_stream_blocks.0.block.attn1.to_q_t.weight" not in table.shapes
    # kohya's flattened names are unambiguous (to_q vs to_q_t, experts.0.w1 vs shared_experts.w1)
    assert len(table.flat["hidream"]) == len(table.slots["hidream"])


@pytest.mark.parametrize("a", LORA_FORMATS)
def test_round_trip_through_every_format(a):
    assert_round_trips("hidream", thinned(), a)


def test_diffusers_converter_reads_our_ai_toolkit_file():
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    tensors, meta = diffusers_fixture("hidream", modules=thinned())
    lora = lora_from_tensors(tensors, meta)
    ait, _ = lora_tensors(lora.modules, "hidream", "ai-toolkit")
    assert all(k.startswith("diffusion_model.") for k in ait)
    theirs = conv._convert_non_diffusers_hidream_lora_to_diffusers({k: v.clone() for k, v in ait.items()})
    ours, ours_meta = lora_tensors(lora.modules, "hidream", "diffusers")
    assert sorted(theirs) == sorted(ours)
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-6)


def test_simpletuner_lycoris_and_transformer_files_and_e1():
    g = torch.Generator().manual_seed(2)
    name = "double_stream_blocks.3.block.ff_i.experts.2.w3"
    lycoris = {f"lycoris_{name.replace('.', '_')}.lokr_w1": torch.randn(4, 8, generator=g),
               f"lycoris_{name.replace('.', '_')}.lokr_w2": torch.randn(1728, 320, generator=g),
               "lycoris_single_stream_blocks_7_block_attn1_to_out.lora_down.weight": torch.randn(4, D, generator=g),
               "lycoris_single_stream_blocks_7_block_attn1_to_out.lora_up.weight": torch.randn(D, 4, generator=g),
               "lycoris_single_stream_blocks_7_block_attn1_to_out.alpha": torch.tensor(2.0)}
    lora = lora_from_tensors(lycoris, {"modelspec.architecture": "hidream-e1/lora"})
    assert (lora.family, lora.format, lora.variant) == ("hidream", "lycoris", "E1")
    assert {m.target.key for m in lora.modules} == {f"{name}.weight", "single_stream_blocks.7.block.attn1.to_out.weight"}
    st = {"transformer.double_stream_blocks.0.block.attn1.to_k_t.lora_A.weight": torch.randn(2, D, generator=g),
          "transformer.double_stream_blocks.0.block.attn1.to_k_t.lora_B.weight": torch.randn(D, 2, generator=g)}
    plain = lora_from_tensors(st, {})
    assert (plain.family, plain.format, plain.variant) == ("hidream", "diffusers", None)


def tiny_hidream():
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(5)
    return HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, caption_channels=[12, 16],
                                          text_emb_dim=20, num_routed_experts=3, num_activated_experts=2,
                                          axes_dims_rope=(4, 4), llama_layers=[0, 1, 2, 3, 4])


def test_tiny_hidream_loads_our_diffusers_output(tmp_path):
    """Our diffusers file, written for a HiDream transformer of tiny widths (real module names, experts included),
    loads through diffusers' `load_lora_into_transformer` with every key used and no LoRA layer left without
    weights; fused, each weight is base + our delta."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    model = tiny_hidream()
    slots = FAMILIES["hidream"].table.slots["diffusers"]
    gen = torch.Generator().manual_seed(8)
    mods = []
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            assert name in slots, name  # every Linear of the model has its name in our table
            o, n = module.weight.shape
            t = {"lora_down.weight": torch.randn(2, n, generator=gen) * 0.1,
                 "lora_up.weight": torch.randn(o, 2, generator=gen) * 0.1, "alpha": torch.tensor((1.0, 2.0, 0.5)[i % 3])}
            mods.append(Module(Target(slots[name].key, None, "transformer", (o, n)), t, name))
    assert any(".ff_i.experts.2." in m.source for m in mods) and any(".ff_t." in m.source for m in mods)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), mods, "hidream", "diffusers", dtype=torch.float32, script="test", args=None, inputs=[])
    pipe = diffusers.HiDreamImagePipeline
    state, metadata = pipe.lora_state_dict(str(tmp_path), weight_name=path.name, return_lora_metadata=True)
    pipe.load_lora_into_transformer(state, transformer=model, adapter_name="t", metadata=metadata)
    assert_peft_loaded_and_fused(model, state, mods, base)


def test_merge_into_a_thinned_checkpoint_against_float64(tmp_path):
    g = torch.Generator().manual_seed(3)
    keys = {"double_stream_blocks.2.block.ff_i.experts.1.w2.weight": (D, 6912),
            "single_stream_blocks.30.block.ff_i.gate.weight": (4, D),
            "caption_projection.48.linear.weight": (D, 4096), "final_layer.linear.bias": (64,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in keys.items()}
    save_tensors(tmp_path / "hidream.safetensors", base)
    mods = ("double_stream_blocks.2.block.ff_i.experts.1.w2", "single_stream_blocks.30.block.ff_i.gate",
            "caption_projection.48.linear")
    lora = {}
    for mod in mods:
        o, i = keys[mod + ".weight"]
        lora[f"diffusion_model.{mod}.lora_down.weight"] = torch.randn(3, i, generator=g)
        lora[f"diffusion_model.{mod}.lora_up.weight"] = torch.randn(o, 3, generator=g)
        lora[f"diffusion_model.{mod}.alpha"] = torch.tensor(1.5)
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "hidream.safetensors", "--models", tmp_path / "l.safetensors",
                            "--ratios", "0.7", "--family", "hidream", "--save_to", tmp_path / "o.safetensors"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    for mod in mods:
        down = lora[f"diffusion_model.{mod}.lora_down.weight"].double()
        up = lora[f"diffusion_model.{mod}.lora_up.weight"].double()
        want = base[mod + ".weight"].double() + 0.7 * 0.5 * up @ down
        assert float((out[mod + ".weight"].double() - want).norm() / want.norm()) < 1e-6, mod
    assert out["final_layer.linear.bias"].equal(base["final_layer.linear.bias"])


def test_flux_lora_into_hidream_checkpoint_names_both(tmp_path):
    g = torch.Generator().manual_seed(4)
    save_tensors(tmp_path / "hidream.safetensors",
                 {"double_stream_blocks.0.block.attn1.to_q.weight": torch.randn(D, D, generator=g)})
    save_tensors(tmp_path / "flux.safetensors",
                 {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 3072, generator=g),
                  "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, 2, generator=g)})
    with pytest.raises(LoraToolsError, match="for flux1 but the checkpoint is hidream: a FLUX.1 .*LoRA does not apply "
                                             "to HiDream-I1"):
        run_script(merge_lora, ["--sd_model", tmp_path / "hidream.safetensors", "--models", tmp_path / "flux.safetensors",
                                "--family", "hidream", "--save_to", tmp_path / "o.safetensors"])
    assert not (tmp_path / "o.safetensors").exists()
