"""diffusers as an outside oracle: its converters and loaders must accept our kohya and diffusers outputs and
apply the same weight deltas our adapters compute (formats.md §8). Tiny models are built from configs
(no download); SD/SDXL module names do not depend on widths, so tiny models carry the real names.

Known diffusers bugs avoided (formats.md §7): Flux kohya non-block modules lose their `transformer.` prefix
(#8), so Flux kohya is checked through the pure converter; DoRA `dora_scale` is dropped by every loader.
"""

from __future__ import annotations

import os

import pytest
import torch

from library.formats import FAMILIES, Module, Target, lora_tensors
from library.lora_output import write_lora
from library.safetensors_io import load_tensors
from networks import adapter_from_tensors

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

R = 2
# Not kohya targets, and diffusers' kohya converter has no rule for them.
SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding")


def _lora_for(weight: torch.Tensor, gen: torch.Generator, alpha: float) -> dict[str, torch.Tensor]:
    out, inp = weight.shape[:2]
    if weight.dim() == 4:
        down = torch.randn(R, inp, *weight.shape[2:], generator=gen)
        up = torch.randn(out, R, 1, 1, generator=gen)
    else:
        down, up = torch.randn(R, inp, generator=gen), torch.randn(out, R, generator=gen)
    return {"lora_down.weight": down * 0.1, "lora_up.weight": up * 0.1, "alpha": torch.tensor(alpha)}


def modules_for(model: torch.nn.Module, family: str, naming: str, component: str, prefix: str = "",
                seed: int = 0, every: int = 1, alphas=(1.0, float(R), 0.5)) -> tuple[list[Module], dict[str, str]]:
    """Canonical modules for (every `every`-th) Linear/Conv of a live model, at the model's own widths.

    Returns the modules and, for checking, their live parameter name per canonical key.
    """
    slots = FAMILIES[family].table.slots[naming]
    gen = torch.Generator().manual_seed(seed)
    mods, live = [], {}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    for i, name in enumerate(names):
        path = prefix + name
        if path not in slots or i % every or name.startswith(SKIP):
            continue
        slot = slots[path]
        weight = model.get_submodule(name).weight
        alpha = alphas[i % len(alphas)]
        mods.append(Module(Target(slot.key, slot.rows, component, tuple(weight.shape)),
                           _lora_for(weight, gen, alpha), path))
        live[(slot.key, slot.rows)] = name
    return mods, live


def check_fused(model, base: dict[str, torch.Tensor], mods: list[Module], live: dict[str, str], rtol=1e-4) -> int:
    """Compare fused weights with base + our adapter delta; return how many modules were checked."""
    # PEFT keeps the (now merged) weight under `.base_layer` of the wrapped module.
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    checked = 0
    for m in mods:
        key = live[(m.target.key, m.target.rows)] + ".weight"
        got = (state[key] - base[key]).double()
        want = adapter_from_tensors(m.tensors).delta(tuple(got.shape)).double()
        assert torch.allclose(got, want, rtol=rtol, atol=1e-6 * want.abs().max()), m.source
        checked += 1
    return checked


def merge_text_encoder(te) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in te.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()


def tiny_sd1_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, norm_num_groups=8)


def tiny_clip(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _te_prefix(te) -> str:
    # transformers >= 5 CLIPTextModel has no `text_model.` level; file formats keep it (formats.md §2.7).
    return "" if any(n.startswith("text_model.") for n, _ in te.named_modules()) else "text_model."


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sd1_unet_and_text_encoder_load_in_diffusers(fmt, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, te = tiny_sd1_unet(), tiny_clip()
    # diffusers 0.42.1 bug (found here): its kohya path builds PEFT alpha_pattern keys from old-format names
    # (`…processor.to_k_lora.down.weight`, TE `…self_attn`) that match nothing, so every module gets the most
    # common alpha. Kohya files are therefore checked with one alpha (≠ rank); our PEFT output with mixed ones.
    alphas = (1.0,) if fmt == "kohya" else (1.0, float(R), 0.5)
    unet_mods, unet_live = modules_for(unet, "sd1", "diffusers", "unet", alphas=alphas)
    te_mods, te_live = modules_for(te, "sd1", "clip_l", "te1", prefix=_te_prefix(te), seed=1, alphas=alphas)
    base_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    base_te = {k: v.clone() for k, v in te.state_dict().items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), unet_mods + te_mods, "sd1", fmt, dtype=torch.float32, script="test", args=None, inputs=[])
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tmp_path), weight_name=path.name,
                                                                      return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name="t", metadata=metadata)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te, prefix="text_encoder",
                                                        adapter_name="t", metadata=metadata)
    unet.fuse_lora(lora_scale=1.0)
    merge_text_encoder(te)
    assert check_fused(unet, base_unet, unet_mods, unet_live) == len(unet_mods) > 100
    assert check_fused(te, base_te, te_mods, te_live) == len(te_mods) == 12


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=112, norm_num_groups=8)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_unet_and_both_text_encoders_load_in_diffusers(fmt, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet, te1, te2 = tiny_sdxl_unet(), tiny_clip(), tiny_clip(with_projection=True)
    alphas = (1.0,) if fmt == "kohya" else (1.0, float(R), 0.5)  # see the SD1 test for the kohya alpha bug
    unet_mods, unet_live = modules_for(unet, "sdxl", "diffusers", "unet", every=3, alphas=alphas)
    te1_mods, te1_live = modules_for(te1, "sdxl", "clip_l", "te1", prefix=_te_prefix(te1), seed=1, alphas=alphas)
    te2_mods, te2_live = modules_for(te2, "sdxl", "clip_g", "te2", prefix=_te_prefix(te2), seed=2, alphas=alphas)
    bases = [{k: v.clone() for k, v in m.state_dict().items()} for m in (unet, te1, te2)]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), unet_mods + te1_mods + te2_mods, "sdxl", fmt, dtype=torch.float32, script="test", args=None,
               inputs=[])
    written = load_tensors(str(path))[0]
    if fmt == "kohya":
        assert any(k.startswith("lora_unet_input_blocks_7_1_transformer_blocks_9_") for k in written)  # SGM names
    state, net_alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(tmp_path), weight_name=path.name, unet_config=unet.config, return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_unet(state, net_alphas, unet=unet, adapter_name="t", metadata=metadata)
    for te, prefix in ((te1, "text_encoder"), (te2, "text_encoder_2")):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(state, net_alphas, text_encoder=te, prefix=prefix,
                                                              adapter_name="t", metadata=metadata)
        merge_text_encoder(te)
    unet.fuse_lora(lora_scale=1.0)
    assert check_fused(unet, bases[0], unet_mods, unet_live) == len(unet_mods) > 50
    assert check_fused(te1, bases[1], te1_mods, te1_live) == 12
    assert check_fused(te2, bases[2], te2_mods, te2_live) == 12


def test_flux_kohya_output_matches_diffusers_converter():
    """Our kohya Flux file through diffusers' own kohya converter gives, module by module, the same deltas as
    our diffusers output (real widths; one double block, one single block; deltas compared on probes).
    The final-layer modules come out of diffusers without their `transformer.` prefix (its bug), so
    they are only checked to be there; our own final-layer conversion is pinned in test_formats_fused."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    table = FAMILIES["flux1"].table
    gen = torch.Generator().manual_seed(5)
    mods = []
    keys = [k for k in table.shapes if k.startswith(("double_blocks.0.", "single_blocks.0.", "final_layer."))]
    for i, key in enumerate(keys):
        shape = table.shapes[key]
        t = {"lora_down.weight": torch.randn(R, shape[1], generator=gen), "lora_up.weight": torch.randn(shape[0], R,
                                                                                                          generator=gen),
             "alpha": torch.tensor((1.0, 2.0, 0.5)[i % 3])}
        mods.append(Module(Target(key, None, "transformer", shape), t, key))
    kohya, _ = lora_tensors(mods, "flux1", "kohya")
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()})
    ours, meta = lora_tensors(mods, "flux1", "diffusers")
    from library.formats import lora_from_tensors

    our_modules = {m.source: m for m in lora_from_tensors(ours, meta).modules}
    probe = {n: torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (3072, 12288, 15360)}
    checked, prefixless = 0, []
    for key in theirs:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        if not name.startswith("transformer."):
            prefixless.append(name)  # diffusers bug (formats.md §3.4): non-block modules lose `transformer.`
            continue
        up, down = adapter_from_tensors(our_modules[name].tensors).factors()  # scale folded into up
        x = probe[down.shape[1]]
        want = up.double() @ (down.double() @ x)
        got = theirs[name + ".lora_B.weight"].double() @ (theirs[key].double() @ x)  # alpha baked by diffusers
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), name
        checked += 1
    assert checked == 14 + 6
    assert sorted(prefixless) == ["norm_out.linear", "proj_out"]


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(3)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def test_flux_peft_output_with_adapter_metadata_loads_in_diffusers(tmp_path):
    from diffusers import FluxPipeline

    model = tiny_flux()
    mods, live = [], {}
    gen = torch.Generator().manual_seed(6)
    slots = FAMILIES["flux1"].table.slots["diffusers"]
    for i, (name, module) in enumerate(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name in slots:
            slot = slots[name]
            t = _lora_for(module.weight, gen, (1.0, float(R), 0.5, 4.0)[i % 4])
            # a target per diffusers module at the tiny width; rows name the slice it is in the fused weight
            mods.append(Module(Target(slot.key, slot.rows, "transformer", tuple(module.weight.shape)), t, name))
            live[(slot.key, slot.rows)] = name
    base = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_lora(str(path), mods, "flux1", "diffusers", dtype=torch.float32, script="test", args=None, inputs=[])
    state, metadata = FluxPipeline.lora_state_dict(str(tmp_path), weight_name=path.name, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, None, transformer=model, adapter_name="t", metadata=metadata)
    model.fuse_lora(lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for m in mods:
        key = live[(m.target.key, m.target.rows)] + ".weight"
        got = (fused[key] - base[key]).double()
        want = adapter_from_tensors(m.tensors).delta(tuple(got.shape)).double()
        if m.target.key == "final_layer.adaLN_modulation.1.weight":
            want = torch.cat([want[want.shape[0] // 2:], want[: want.shape[0] // 2]])
        # includes top-level proj_out (alpha_pattern shadowing of single blocks' proj_out)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), m.source
    assert len(mods) > 25
