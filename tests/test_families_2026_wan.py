"""Wan 2.2 (issue 16): the TI2V-5B family, and the A14B high-noise / low-noise expert pairs in convert_lora.py
and wan22_merge_lora.py.

The 5B shapes are checked against diffusers' own WanTransformer3DModel built on the meta device from the
5B configuration (no download); the A14B experts have the Wan 2.1-14B reference list's names and shapes.
"""

from __future__ import annotations

import pytest
import torch

import convert_lora
import wan22_merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, lora_from_tensors, lora_tensors, read_lora
from library.formats.wan22 import EXPERT_KEY, expert_of, expert_outputs, partner_path
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_round_trips,
    assert_same_deltas,
    diffusers_fixture,
    needs_shapes,
    probe_deltas,
    run_script,
)

FORMATS = LORA_FORMATS


def diffusers_5b_modules() -> dict[str, tuple[int, ...]]:
    """`transformer.<module>` -> weight shape of diffusers' Wan 2.2 TI2V-5B transformer (meta device)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
            text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
    return {"transformer." + n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv3d)}


def test_5b_table_is_diffusers_own_model():
    modules = diffusers_5b_modules()
    table = FAMILIES["wan22_5b"].table
    slots = table.slots["diffusers"]
    assert {"transformer." + p for p in slots} == set(modules)
    for path, slot in slots.items():
        assert table.shapes[slot.key] == modules["transformer." + path], path
    assert table.slots["wan"]["blocks.29.ffn.0"].key == "blocks.29.ffn.0.weight"
    assert table.shapes["head.head.weight"] == (192, 3072)


@pytest.mark.parametrize("a", FORMATS)
def test_5b_round_trip_through_every_format(a):
    assert_round_trips("wan22_5b", diffusers_5b_modules(), a)


def test_diffusers_wan_converter_reads_our_5b_comfy_file():
    """diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` (Wan 2.1 and 2.2 alike) gives our deltas."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    modules = {k: s for k, s in diffusers_5b_modules().items() if k.startswith("transformer.blocks.0.")}
    tensors, meta = diffusers_fixture("wan22_5b", modules=modules)
    lora = lora_from_tensors(tensors, meta)
    comfy, _ = lora_tensors(lora.modules, "wan22_5b", "comfy")
    assert all(k.startswith("diffusion_model.blocks.0.") for k in comfy)
    # diffusers 0.42.1 scales the cross-attention factors in place (`converted[k] *= scale`), which would change
    # the tensors our modules share with `comfy`: it gets copies.
    theirs = conv._convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in comfy.items()})
    ours, ours_meta = lora_tensors(lora.modules, "wan22_5b", "diffusers")
    theirs = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in theirs.items()}
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-6)


# ---- expert pairs -------------------------------------------------------------------------------------------

def test_expert_names_and_partners():
    assert expert_of("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors") == "high_noise"
    assert expert_of("x/Style-LOW.safetensors") == "low_noise"
    assert expert_of("lora_HN.safetensors") == "high_noise"
    assert expert_of("highlight.safetensors") is None and expert_of("plain.safetensors") is None
    assert expert_of("high_low.safetensors") is None  # says both
    assert expert_of("a.safetensors", {"ss_output_name": "mystyle_low_noise"}) == "low_noise"
    assert expert_of("a_high_noise.safetensors", {EXPERT_KEY: "low_noise"}) == "low_noise"  # ours wins
    assert partner_path("d/a_high_noise.safetensors") == "d/a_low_noise.safetensors"
    assert partner_path("Style-LOW.safetensors") == "Style-HIGH.safetensors"
    assert partner_path("Wan_HighNoise.safetensors") == "Wan_LowNoise.safetensors"
    assert partner_path("plain.safetensors") is None
    assert expert_outputs("o.safetensors", ["high_noise", "low_noise"]) == {
        "high_noise": "o_high_noise.safetensors", "low_noise": "o_low_noise.safetensors"}
    assert expert_outputs("o_HIGH.safetensors", ["high_noise", "low_noise"]) == {
        "high_noise": "o_HIGH.safetensors", "low_noise": "o_LOW.safetensors"}


def _wan_lora(seed: int, blocks=(0, 39)) -> dict[str, torch.Tensor]:
    """musubi-tuner style (`lora_unet_blocks_N_…`, with alpha) on 14B shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    mods = {f"lora_unet_blocks_{b}_{m}": s for b in blocks
            for m, s in (("self_attn_q", (5120, 5120)), ("ffn_2", (5120, 13824)))}
    mods["lora_unet_head_head"] = (64, 5120)
    mods["lora_unet_time_embedding_0"] = (5120, 256)
    for name, (o, i) in mods.items():
        out[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


@needs_shapes
def test_convert_a_pair_by_flags_and_by_name(tmp_path, capsys):
    high, low = _wan_lora(1), _wan_lora(2)
    save_tensors(tmp_path / "s_high_noise.safetensors", high)
    save_tensors(tmp_path / "s_low_noise.safetensors", low)
    run_script(convert_lora, ["--to", "diffusers", "--high_noise", str(tmp_path / "s_high_noise.safetensors"),
                              "--low_noise", str(tmp_path / "s_low_noise.safetensors"), str(tmp_path / "out.safetensors")])
    assert "Wan 2.2 A14B expert pair" in capsys.readouterr().out
    for expert, src in (("high_noise", high), ("low_noise", low)):
        tensors, meta = load_tensors(tmp_path / f"out_{expert}.safetensors")
        assert meta[EXPERT_KEY] == expert and all(k.startswith("transformer.") for k in tensors)
        assert read_lora(tmp_path / f"out_{expert}.safetensors").family == "wan21"
        back, back_meta = lora_tensors(lora_from_tensors(tensors, meta).modules, "wan21", "kohya")
        assert sorted(back) == sorted(src)
        assert_same_deltas(probe_deltas(src), probe_deltas(back, back_meta))
    # the input alone, named for one expert with its partner next to it: both are converted
    run_script(convert_lora, ["--to", "comfy", str(tmp_path / "s_low_noise.safetensors"),
                              str(tmp_path / "c_low_noise.safetensors")])
    for expert, src in (("high_noise", high), ("low_noise", low)):
        tensors, meta = load_tensors(tmp_path / f"c_{expert}.safetensors")
        assert all(k.startswith("diffusion_model.") for k in tensors)
        back, back_meta = lora_tensors(lora_from_tensors(tensors, meta).modules, "wan21", "kohya")
        assert sorted(back) == sorted(src)
        assert_same_deltas(probe_deltas(src), probe_deltas(back, back_meta))


def test_pair_flags_refuse_other_families_and_a_doubled_input(tmp_path):
    g = torch.Generator().manual_seed(0)
    flux = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, 3072, generator=g),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(3072, 2, generator=g)}
    save_tensors(tmp_path / "f_high.safetensors", flux)
    with pytest.raises(LoraToolsError, match="Wan 2.2 A14B expert LoRA, but this is a flux1 LoRA"):
        run_script(convert_lora, ["--to", "comfy", "--high_noise", str(tmp_path / "f_high.safetensors"),
                                  str(tmp_path / "o.safetensors")])
    with pytest.raises(LoraToolsError, match="not both"):
        run_script(convert_lora, ["--to", "comfy", str(tmp_path / "f_high.safetensors"), str(tmp_path / "o.safetensors"),
                                  "--high_noise", str(tmp_path / "f_high.safetensors")])
    assert not list(tmp_path.glob("o*.safetensors"))


def _expert_checkpoint(path, seed) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"head.head.weight": torch.randn(64, 5120, generator=g) * 0.05, "head.head.bias": torch.zeros(64),
               "time_embedding.0.weight": torch.randn(5120, 256, generator=g) * 0.05}
    save_tensors(path, tensors)
    return tensors


@needs_shapes
def test_pair_merged_into_the_two_experts_against_float64(tmp_path, capsys):
    hi_ckpt, lo_ckpt = tmp_path / "wan2.2_t2v_high_noise_14B.safetensors", tmp_path / "wan2.2_t2v_low_noise_14B.safetensors"
    hi_base, lo_base = _expert_checkpoint(hi_ckpt, 1), _expert_checkpoint(lo_ckpt, 2)
    high, low, both = _wan_lora(3), _wan_lora(4), _wan_lora(5)
    for name, t in (("a_high_noise", high), ("a_low_noise", low), ("both", both)):
        save_tensors(tmp_path / f"{name}.safetensors", t)
    run_script(wan22_merge_lora, [
        "--high_noise_model", str(hi_ckpt), "--low_noise_model", str(lo_ckpt),
        "--high_noise", str(tmp_path / "a_high_noise.safetensors"), "--high_noise_ratios", "0.8",
        "--low_noise", str(tmp_path / "a_low_noise.safetensors"),
        "--models", str(tmp_path / "both.safetensors"), "--ratios", "-0.5",
        "--save_to", str(tmp_path / "m.safetensors"), "--allow_unmatched"])  # block modules: thinned checkpoints
    capsys.readouterr()

    def delta(t, name):
        d, u = t[f"{name}.lora_down.weight"].double(), t[f"{name}.lora_up.weight"].double()
        return float(t[f"{name}.alpha"]) / d.shape[0] * (u @ d)

    for expert, base, own, ratio in (("high_noise", hi_base, high, 0.8), ("low_noise", lo_base, low, 1.0)):
        out, _ = load_tensors(tmp_path / f"m_{expert}.safetensors")
        assert sorted(out) == sorted(base)
        for key, name in (("head.head.weight", "lora_unet_head_head"),
                          ("time_embedding.0.weight", "lora_unet_time_embedding_0")):
            want = base[key].double() + ratio * delta(own, name) - 0.5 * delta(both, name)
            assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, (expert, key)
        assert out["head.head.bias"].equal(base["head.head.bias"])


def test_swapped_pair_is_refused(tmp_path):
    hi_ckpt, lo_ckpt = tmp_path / "h_high_noise.safetensors", tmp_path / "l_low_noise.safetensors"
    _expert_checkpoint(hi_ckpt, 1)
    _expert_checkpoint(lo_ckpt, 2)
    save_tensors(tmp_path / "a_low_noise.safetensors", _wan_lora(3, blocks=()))
    with pytest.raises(LoraToolsError, match="given as --high_noise but its name or metadata says low_noise"):
        run_script(wan22_merge_lora, ["--high_noise_model", str(hi_ckpt), "--low_noise_model", str(lo_ckpt),
                                      "--high_noise", str(tmp_path / "a_low_noise.safetensors"),
                                      "--save_to", str(tmp_path / "m.safetensors")])
    with pytest.raises(LoraToolsError, match="given as --high_noise_model but its name says low_noise"):
        run_script(wan22_merge_lora, ["--high_noise_model", str(lo_ckpt), "--low_noise_model", str(hi_ckpt),
                                      "--models", str(tmp_path / "a_low_noise.safetensors"),
                                      "--save_to", str(tmp_path / "m.safetensors")])
    assert not list(tmp_path.glob("m*.safetensors"))
