"""The FLUX.1 derivatives and variants (issue 16): Chroma, FLUX.1 Fill, Kontext / Krea, and the checkpoint
markers of SDXL derivatives (NoobAI / Illustrious v-pred).

Fixtures carry the real module names and shapes of the reference lists (`chroma.tsv`, `flux1_*.tsv`), rank 2,
repeated blocks thinned; deltas are checked on random probes in float64 (tests/helpers.probe_deltas), and
merges against `W + ratio·(alpha/r)·up@down` in float64 written out here.
"""

from __future__ import annotations

import json

import pytest
import torch

import flux_merge_lora
import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, lora_from_tensors, lora_tensors
from library.formats.match import detect
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    assert_same_deltas,
    diffusers_fixture,
    kohya_fixture,
    needs_shapes,
    probe_deltas,
    rows,
    run_script,
)

FORMATS = ("kohya", "diffusers", "ai-toolkit", "comfy")
H = 3072


def chroma_modules() -> dict[str, tuple[int, ...]]:
    """Chroma's diffusers modules (transformer) from the reference list, under `transformer.`."""
    return {"transformer." + p: s for p, s in rows("chroma")}


def shapes_of(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# ---- the tables -------------------------------------------------------------------------------------------

@needs_shapes
def test_chroma_table_is_flux_without_modulations_plus_the_guidance_layer():
    chroma, flux = FAMILIES["chroma"].table, FAMILIES["flux1"].table
    # every diffusers module of the reference list, with its shape (rows of a fused BFL weight included)
    listed = dict(rows("chroma"))
    slots = chroma.slots["diffusers"]
    assert set(slots) == set(listed)
    for path, slot in slots.items():
        full = chroma.shapes[slot.key]
        got = (slot.rows[1] - slot.rows[0], *full[1:]) if slot.rows else full
        assert got == listed[path], path
    shared = set(chroma.shapes) & set(flux.shapes)
    assert all(chroma.shapes[k] == flux.shapes[k] for k in shared)
    assert not any("_mod.lin" in k or "modulation.lin" in k or k.startswith(("time_in", "vector_in", "guidance_in"))
                   for k in chroma.shapes)
    # ComfyUI/BFL names of the guidance MLPs (diffusers renames in_layer/out_layer to linear_1/linear_2)
    assert chroma.slots["bfl"]["distilled_guidance_layer.layers.4.out_layer"].key == \
        "distilled_guidance_layer.layers.4.out_layer.weight"
    assert chroma.shapes["distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    assert chroma.slots["bfl"]["single_blocks.37.linear1"].key == "single_blocks.37.linear1.weight"


@needs_shapes
def test_fill_table_differs_from_flux_only_by_the_wider_img_in():
    fill, flux = FAMILIES["flux1_fill"].table, FAMILIES["flux1"].table
    assert set(fill.shapes) == set(flux.shapes)
    assert [k for k in flux.shapes if fill.shapes[k] != flux.shapes[k]] == ["img_in.weight"]
    assert fill.shapes["img_in.weight"] == (H, 384)


# ---- round trips --------------------------------------------------------------------------------------------

@needs_shapes
@pytest.mark.parametrize("a", FORMATS)
def test_chroma_round_trip_through_every_format(a):
    tensors, meta = diffusers_fixture("chroma", modules=chroma_modules())
    if a != "diffusers":
        tensors, meta = lora_tensors(lora_from_tensors(tensors, meta, family="chroma").modules, "chroma", a)
    expected = probe_deltas(tensors, meta)
    for b in FORMATS:
        if b == a:
            continue
        lora = lora_from_tensors(tensors, meta)  # detected: the guidance layer is Chroma's alone
        assert lora.family == "chroma"
        mid, mid_meta = lora_tensors(lora.modules, "chroma", b)
        back_lora = lora_from_tensors(mid, mid_meta)
        assert back_lora.family == "chroma"
        back, back_meta = lora_tensors(back_lora.modules, "chroma", a)
        assert sorted(back) == sorted(tensors), f"{a} -> {b} -> {a} changed the key set"
        assert_same_deltas(expected, probe_deltas(back, back_meta))


@needs_shapes
def test_chroma_kohya_names_are_bfl_flattened():
    tensors, meta = diffusers_fixture("chroma", modules=chroma_modules())
    kohya, _ = lora_tensors(lora_from_tensors(tensors, meta).modules, "chroma", "kohya")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_37_linear1",
                 "lora_unet_distilled_guidance_layer_layers_0_in_layer", "lora_unet_distilled_guidance_layer_in_proj",
                 "lora_unet_final_layer_linear", "lora_unet_img_in"):
        assert name in names
    assert not any("_mod_" in n or "modulation" in n for n in names)


@needs_shapes
def test_fill_round_trip_and_detection_by_img_in_width():
    flux = kohya_fixture("flux1")
    wide = dict(flux)
    g = torch.Generator().manual_seed(5)
    wide["lora_unet_img_in.lora_down.weight"] = torch.randn(2, 384, generator=g)
    assert lora_from_tensors(flux, {}, family="flux1").family == "flux1"
    lora = lora_from_tensors(wide, {})
    assert lora.family == "flux1_fill"
    expected = probe_deltas(wide)
    for fmt in ("diffusers", "ai-toolkit", "comfy"):
        mid, meta = lora_tensors(lora.modules, "flux1_fill", fmt)
        again = lora_from_tensors(mid, meta)
        assert again.family == "flux1_fill"
        back, back_meta = lora_tensors(again.modules, "flux1_fill", "kohya")
        assert sorted(back) == sorted(wide)
        assert_same_deltas(expected, probe_deltas(back, back_meta))


# ---- detection ---------------------------------------------------------------------------------------------

def _kohya(names: dict[str, tuple[int, int]], seed=0, alpha=1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (o, i) in names.items():
        out[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


ATTENTION = {"lora_unet_double_blocks_0_img_attn_proj": (H, H), "lora_unet_double_blocks_0_txt_attn_proj": (H, H)}
MODULATED = {**ATTENTION, "lora_unet_double_blocks_0_img_mod_lin": (6 * H, H),
             "lora_unet_single_blocks_0_modulation_lin": (3 * H, H), "lora_unet_final_layer_linear": (64, H)}
GUIDED = {**ATTENTION, "lora_unet_distilled_guidance_layer_in_proj": (5120, 64)}


def test_detection_between_flux_and_its_derivatives():
    def family(names, meta=None):
        return detect(shapes_of(_kohya(names)), meta or {}).family.name

    assert family(MODULATED) == "flux1"
    assert family(GUIDED) == "chroma"
    # attention-only: fits FLUX.1, Chroma and Fill alike; FLUX.1 unless the metadata names the derivative
    assert family(ATTENTION) == "flux1"
    assert family(ATTENTION, {"ss_base_model_version": "chroma"}) == "chroma"
    assert family(ATTENTION, {"modelspec.architecture": "chroma/lora"}) == "chroma"


def test_kontext_krea_and_qwen_edit_are_variants_named_from_metadata():
    attention = _kohya(ATTENTION)
    assert lora_from_tensors(attention, {"modelspec.architecture": "flux-1-kontext-dev/lora"}).variant == "Kontext"
    assert lora_from_tensors(attention, {"ss_sd_model_name": "flux1-krea-dev.safetensors"}).variant == "Krea"
    assert lora_from_tensors(attention, {"ss_sd_model_name": "krea2-base.safetensors"}).variant is None
    assert lora_from_tensors(attention, {}).variant is None
    g = torch.Generator().manual_seed(1)
    qwen = {"transformer.transformer_blocks.0.img_mod.1.lora_A.weight": torch.randn(2, H, generator=g),
            "transformer.transformer_blocks.0.img_mod.1.lora_B.weight": torch.randn(6 * H, 2, generator=g)}
    edit = lora_from_tensors(qwen, {"modelspec.architecture": "qwen-image-edit-2509/lora"})
    assert (edit.family, edit.variant) == ("qwen_image", "Edit")
    assert lora_from_tensors(qwen, {}).variant is None


# ---- merges into checkpoints -----------------------------------------------------------------------------

CHROMA_CKPT = {"double_blocks.0.img_attn.proj.weight": (H, H), "double_blocks.0.txt_attn.proj.weight": (H, H),
               "double_blocks.0.img_attn.proj.bias": (H,), "final_layer.linear.weight": (64, H),
               "distilled_guidance_layer.in_proj.weight": (5120, 64), "img_in.weight": (H, 64),
               "double_blocks.0.img_attn.norm.query_norm.scale": (128,)}


def _checkpoint(path, shapes, seed=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_tensors(path, tensors)
    return tensors


def _expected(base: torch.Tensor, lora: dict[str, torch.Tensor], name: str, ratio: float) -> torch.Tensor:
    down, up = lora[f"{name}.lora_down.weight"].double(), lora[f"{name}.lora_up.weight"].double()
    scale = float(lora[f"{name}.alpha"]) / down.shape[0]
    return base.double() + ratio * scale * (up @ down)


def _check_flux_into_chroma(out, base, lora, ratio):
    for key, name in (("double_blocks.0.img_attn.proj.weight", "lora_unet_double_blocks_0_img_attn_proj"),
                      ("double_blocks.0.txt_attn.proj.weight", "lora_unet_double_blocks_0_txt_attn_proj"),
                      ("final_layer.linear.weight", "lora_unet_final_layer_linear")):
        want = _expected(base[key], lora, name, ratio)
        assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, key
    for key in ("distilled_guidance_layer.in_proj.weight", "img_in.weight", "double_blocks.0.img_attn.proj.bias",
                "double_blocks.0.img_attn.norm.query_norm.scale"):
        assert out[key].equal(base[key]), key


def test_flux_lora_into_chroma_drops_the_modulations_with_a_note(tmp_path, capsys):
    ckpt = tmp_path / "chroma.safetensors"
    base = _checkpoint(ckpt, CHROMA_CKPT)
    lora = _kohya(MODULATED, seed=4, alpha=1.0)
    save_tensors(tmp_path / "flux_lora.safetensors", lora, {"ss_base_model_version": "flux1"})
    out_path = tmp_path / "out.safetensors"
    run_script(merge_lora, ["--sd_model", str(ckpt), "--models", str(tmp_path / "flux_lora.safetensors"),
                            "--ratios", "0.7", "--family", "chroma", "--save_to", str(out_path)])
    printed = capsys.readouterr().out
    assert "2 flux1 module(s) have no counterpart in Chroma" in printed
    assert "lora_unet_double_blocks_0_img_mod_lin" in printed and "lora_unet_single_blocks_0_modulation_lin" in printed
    out, _ = load_tensors(out_path)
    assert sorted(out) == sorted(base)
    _check_flux_into_chroma(out, base, lora, 0.7)
    # flux_merge_lora.py recognises the Chroma checkpoint by its guidance layer and does the same
    out2 = tmp_path / "out2.safetensors"
    run_script(flux_merge_lora, ["--flux_model", str(ckpt), "--models", str(tmp_path / "flux_lora.safetensors"),
                                 "--ratios", "0.7", "--save_to", str(out2)])
    assert "no counterpart in Chroma" in capsys.readouterr().err
    merged2, _ = load_tensors(out2)
    _check_flux_into_chroma(merged2, base, lora, 0.7)


def test_chroma_lora_into_chroma_checkpoint_in_diffusers_names(tmp_path):
    ckpt = tmp_path / "chroma.safetensors"
    base = _checkpoint(ckpt, CHROMA_CKPT)
    g = torch.Generator().manual_seed(8)
    peft = {"transformer.distilled_guidance_layer.in_proj.lora_A.weight": torch.randn(2, 64, generator=g),
            "transformer.distilled_guidance_layer.in_proj.lora_B.weight": torch.randn(5120, 2, generator=g),
            "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.randn(2, H, generator=g),
            "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.randn(H, 2, generator=g)}
    save_tensors(tmp_path / "c.safetensors", peft)
    run_script(merge_lora, ["--sd_model", str(ckpt), "--models", str(tmp_path / "c.safetensors"), "--family", "chroma",
                            "--save_to", str(tmp_path / "o.safetensors")])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    for key, mod in (("distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.in_proj"),
                     ("double_blocks.0.img_attn.proj.weight", "transformer_blocks.0.attn.to_out.0")):
        b, a = peft[f"transformer.{mod}.lora_B.weight"].double(), peft[f"transformer.{mod}.lora_A.weight"].double()
        want = base[key].double() + b @ a  # no alpha in the file: scale 1
        assert float((out[key].double() - want).norm() / want.norm()) < 1e-6


def test_other_families_into_chroma_or_flux_are_clear_errors(tmp_path):
    ckpt = tmp_path / "chroma.safetensors"
    _checkpoint(ckpt, CHROMA_CKPT)
    flux_ckpt = tmp_path / "flux.safetensors"
    _checkpoint(flux_ckpt, {k: s for k, s in CHROMA_CKPT.items() if "distilled" not in k})
    save_tensors(tmp_path / "chroma_lora.safetensors", _kohya(GUIDED))
    with pytest.raises(LoraToolsError, match=r"for chroma but the checkpoint is flux1: a Chroma .* LoRA does not "
                                             r"apply to FLUX.1"):
        run_script(merge_lora, ["--sd_model", str(flux_ckpt), "--models", str(tmp_path / "chroma_lora.safetensors"),
                                "--family", "flux1", "--save_to", str(tmp_path / "x.safetensors")])
    g = torch.Generator().manual_seed(2)
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(2, 640, generator=g),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(640, 2, generator=g),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 1280, generator=g),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5120, 2, generator=g)}
    save_tensors(tmp_path / "sdxl.safetensors", sdxl)
    with pytest.raises(LoraToolsError, match=r"for sdxl but the checkpoint is chroma: a Stable Diffusion XL LoRA "
                                             r"does not apply to Chroma"):
        run_script(merge_lora, ["--sd_model", str(ckpt), "--models", str(tmp_path / "sdxl.safetensors"),
                                "--family", "chroma", "--save_to", str(tmp_path / "y.safetensors")])
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_flux_dev_lora_into_fill_checkpoint_drops_the_narrow_img_in(tmp_path, capsys):
    shapes = {"img_in.weight": (H, 384), "double_blocks.0.img_attn.proj.weight": (H, H)}
    ckpt = tmp_path / "fill.safetensors"
    base = _checkpoint(ckpt, shapes)
    lora = _kohya({"lora_unet_img_in": (H, 64), "lora_unet_double_blocks_0_img_attn_proj": (H, H)}, seed=6, alpha=2.0)
    save_tensors(tmp_path / "dev.safetensors", lora)
    run_script(flux_merge_lora, ["--flux_model", str(ckpt), "--models", str(tmp_path / "dev.safetensors"),
                                 "--save_to", str(tmp_path / "o.safetensors")])
    assert "lora_unet_img_in" in capsys.readouterr().err
    out, _ = load_tensors(tmp_path / "o.safetensors")
    assert out["img_in.weight"].equal(base["img_in.weight"])
    want = _expected(base["double_blocks.0.img_attn.proj.weight"], lora, "lora_unet_double_blocks_0_img_attn_proj", 1.0)
    got = out["double_blocks.0.img_attn.proj.weight"].double()
    assert float((got - want).norm() / want.norm()) < 1e-6


# ---- SDXL derivatives: marker keys ------------------------------------------------------------------------

def test_sdxl_vpred_markers_survive_a_checkpoint_merge(tmp_path):
    """NoobAI / Illustrious v-pred checkpoints carry `v_pred` and `ztsnr` marker tensors (ComfyUI picks the
    sampling from them); a merge must copy them as they are. Their LoRAs are SDXL LoRAs."""
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    g = torch.Generator().manual_seed(0)
    base = {key: torch.randn(640, 2048, generator=g), "v_pred": torch.tensor([]), "ztsnr": torch.tensor([]),
            "edm_vpred.sigma_max": torch.tensor([80.0])}
    save_tensors(tmp_path / "noob.safetensors", base, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    lora = {f"{name}.lora_down.weight": torch.randn(4, 2048, generator=g),
            f"{name}.lora_up.weight": torch.randn(640, 4, generator=g), f"{name}.alpha": torch.tensor(2.0)}
    save_tensors(tmp_path / "l.safetensors", lora, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert lora_from_tensors(lora, {}).family == "sdxl"
    run_script(merge_lora, ["--sd_model", str(tmp_path / "noob.safetensors"), "--models", str(tmp_path / "l.safetensors"),
                            "--family", "sdxl", "--save_to", str(tmp_path / "o.safetensors")])
    out, meta = load_tensors(tmp_path / "o.safetensors")
    assert sorted(out) == sorted(base)
    for marker in ("v_pred", "ztsnr", "edm_vpred.sigma_max"):
        assert out[marker].dtype == base[marker].dtype and out[marker].equal(base[marker])
    want = _expected(base[key], lora, name, 1.0)
    assert float((out[key].double() - want).norm() / want.norm()) < 1e-6
    assert json.loads(json.dumps(meta))["modelspec.architecture"].startswith("stable-diffusion-xl")


# ---- diffusers as oracle ------------------------------------------------------------------------------------

@needs_shapes
def test_diffusers_kohya_flux_converter_reads_our_chroma_files():
    """diffusers loads Chroma LoRAs through the Flux mixin: its kohya converter must give our deltas on the
    double and single blocks (outside them its Flux kohya path has known bugs, formats.md §7 #8)."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    tensors, meta = diffusers_fixture("chroma", modules=chroma_modules())
    lora = lora_from_tensors(tensors, meta)
    # the guidance layer is outside what diffusers' Flux converter knows (it has no rule for it)
    blocks = [m for m in lora.modules if m.target.key.startswith(("double_blocks.", "single_blocks."))]
    ours, ours_meta = lora_tensors(blocks, "chroma", "diffusers")
    kohya, _ = lora_tensors(blocks, "chroma", "kohya")
    theirs = conv._convert_kohya_flux_lora_to_diffusers(dict(kohya))
    theirs = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in theirs.items()}
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-5)


# ---- trainers' layouts -------------------------------------------------------------------------------------

def _module(name: str, out: int, inp: int, peft: bool, g) -> dict[str, torch.Tensor]:
    down, up = ("lora_A.weight", "lora_B.weight") if peft else ("lora_down.weight", "lora_up.weight")
    return {f"{name}.{down}": torch.randn(2, inp, generator=g), f"{name}.{up}": torch.randn(out, 2, generator=g)}


@needs_shapes
@pytest.mark.parametrize(("trainer", "family", "name", "peft", "shape", "target"), [
    # OneTrainer: `lora_transformer_` + flattened diffusers names
    ("onetrainer", "chroma", "lora_transformer_transformer_blocks_0_attn_to_k", False, (H, H),
     ("double_blocks.0.img_attn.qkv.weight", (H, 2 * H))),
    # SimpleTuner LyCORIS: `lycoris_` + flattened diffusers names
    ("simpletuner", "chroma", "lycoris_distilled_guidance_layer_layers_1_linear_2", False, (5120, 5120),
     ("distilled_guidance_layer.layers.1.out_layer.weight", None)),
    # AI-Toolkit, diffusion-pipe, musubi-tuner "other": `diffusion_model.` + original names, PEFT tensors
    ("diffusion-pipe", "chroma", "diffusion_model.single_blocks.2.linear2", True, (H, 5 * H),
     ("single_blocks.2.linear2.weight", None)),
    # diffusion-pipe HunyuanVideo: original names under `transformer.`
    ("diffusion-pipe", "hunyuan_video", "transformer.double_blocks.0.img_mlp.fc1", True, (4 * H, H),
     ("double_blocks.0.img_mlp.fc1.weight", None)),
    # musubi-tuner "default": `lora_unet_` + flattened original names
    ("musubi", "hunyuan_video", "lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv", False, (3 * H, H),
     ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight", None)),
    ("musubi-other", "wan21", "diffusion_model.blocks.3.cross_attn.o", True, (5120, 5120),
     ("blocks.3.cross_attn.o.weight", None)),
])
def test_trainer_layouts_land_on_the_canonical_target(trainer, family, name, peft, shape, target):
    g = torch.Generator().manual_seed(0)
    tensors = _module(name, *shape, peft, g)
    if family == "chroma":  # a module only Chroma has, so the file is Chroma's without metadata
        tensors.update(_module("lora_unet_distilled_guidance_layer_out_proj" if not peft else
                               "diffusion_model.distilled_guidance_layer.out_proj", H, 5120, peft, g))
    lora = lora_from_tensors(tensors, {})
    assert lora.family == family, trainer
    (module,) = [m for m in lora.modules if m.source == name]
    assert (module.target.key, module.target.rows) == (target[0], target[1])
