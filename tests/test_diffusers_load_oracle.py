"""diffusers 0.42.1's own loaders as oracle for convert_lora.py --to diffusers (issue 16): a Wan 2.2 A14B pair
(the high-noise file into `transformer`, the low-noise one into `transformer_2` with `load_into_transformer_2`,
through WanLoraLoaderMixin.load_lora_weights), and Chroma and FLUX.1 LoRAs (FluxLoraLoaderMixin, as
ChromaPipeline/FluxPipeline load them) load with no missing or unexpected key, and every fused weight is
base + the delta written here in float64 from the *input* file (alpha/rank · up@down, rows of a fused qkv /
linear1 sliced by the layout BFL and diffusers document).

The models are diffusers' own classes from their real configurations (so our real-width files fit) built on
the meta device with one or two blocks; only the layers a LoRA touches are given memory, so each model costs a
few hundred MiB. No download.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import convert_lora
from library.safetensors_io import save_tensors
from tests.helpers import dense_delta, needs_shapes, run_script

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANK = 4
H = 3072


def kohya(modules: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (o, inp)) in enumerate(modules.items()):
        out[f"{name}.lora_down.weight"] = torch.randn(RANK, inp, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(o, RANK, generator=g) * 0.1
        out[f"{name}.alpha"] = torch.tensor((1.0, 2.0, 8.0)[i % 3])
    return out


def meta_model(cls, **config):
    with torch.device("meta"):
        return cls(**config)


def materialize(model, names, seed: int) -> dict[str, torch.Tensor]:
    """Give the named Linear layers memory and random weights; their weights (copies) by name."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name in names:
        module = model.get_submodule(name)
        module.to_empty(device="cpu")
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.01)
            if module.bias is not None:
                module.bias.zero_()
        base[name] = module.weight.detach().clone()
    return base


def lora_modules(path) -> list[str]:
    from library.safetensors_io import load_tensors

    tensors, _ = load_tensors(path)
    return sorted({k[len("transformer."):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})


class Warnings(logging.Handler):
    """diffusers' `_maybe_warn_for_unhandled_keys` reports missing/unexpected keys as a warning of this logger."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    handler = Warnings()
    loggers = [logging.getLogger(n) for n in ("diffusers.utils.peft_utils", "diffusers.loaders.peft",
                                              "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.messages
    for lg in loggers:
        lg.removeHandler(handler)


def assert_fused(model, base: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    assert wrapped == sorted(want), "the LoRA's modules are exactly the ones PEFT wrapped"
    model.fuse_lora(lora_scale=1.0)
    for name, delta in want.items():
        got = model.get_submodule(name).base_layer.weight.double()
        err = float((got - base[name].double() - delta).norm() / delta.norm())
        assert err < 1e-5, (name, err)


# ---- Wan 2.2 A14B pair -----------------------------------------------------------------------------------

WAN_INPUT = {"lora_unet_blocks_0_self_attn_q": (5120, 5120), "lora_unet_blocks_1_cross_attn_k": (5120, 5120),
             "lora_unet_blocks_1_ffn_2": (5120, 13824), "lora_unet_head_head": (64, 5120),
             "lora_unet_time_embedding_0": (5120, 256)}
WAN_DIFFUSERS = {"lora_unet_blocks_0_self_attn_q": "blocks.0.attn1.to_q",
                 "lora_unet_blocks_1_cross_attn_k": "blocks.1.attn2.to_k", "lora_unet_blocks_1_ffn_2": "blocks.1.ffn.net.2",
                 "lora_unet_head_head": "proj_out", "lora_unet_time_embedding_0": "condition_embedder.time_embedder.linear_1"}


def wan_14b():
    return meta_model(diffusers.WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=40,
                      attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                      ffn_dim=13824, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)


@needs_shapes
def test_wan22_pair_loads_into_transformer_and_transformer_2(tmp_path, diffusers_warnings):
    from diffusers.loaders import WanLoraLoaderMixin

    inputs = {e: kohya(WAN_INPUT, seed) for e, seed in (("high_noise", 1), ("low_noise", 2))}
    for e, tensors in inputs.items():
        save_tensors(tmp_path / f"style_{e}.safetensors", tensors)
    run_script(convert_lora, ["--to", "diffusers", "--high_noise", tmp_path / "style_high_noise.safetensors",
                              "--low_noise", tmp_path / "style_low_noise.safetensors", tmp_path / "d.safetensors"])

    class WanPair(WanLoraLoaderMixin):  # the two experts of a Wan 2.2 A14B pipeline, nothing else
        transformer_name = "transformer"
        hf_device_map = None  # what DiffusionPipeline has: no accelerate device map, no offload hooks

        def __init__(self):
            self.transformer, self.transformer_2 = wan_14b(), wan_14b()
            self.components = {"transformer": self.transformer, "transformer_2": self.transformer_2}

    pipe = WanPair()
    bases = {}
    for e, model in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        assert lora_modules(tmp_path / f"d_{e}.safetensors") == sorted(WAN_DIFFUSERS.values())
        bases[e] = materialize(model, WAN_DIFFUSERS.values(), seed=len(e))
    pipe.load_lora_weights(str(tmp_path), weight_name="d_high_noise.safetensors", adapter_name="high")
    pipe.load_lora_weights(str(tmp_path), weight_name="d_low_noise.safetensors", adapter_name="low",
                           load_into_transformer_2=True)
    assert diffusers_warnings == []
    for e, model in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        assert_fused(model, bases[e], {WAN_DIFFUSERS[n]: dense_delta(inputs[e], n) for n in WAN_INPUT})


# ---- Chroma and FLUX.1 -----------------------------------------------------------------------------------

QKV = [("attn.to_q", 0, H), ("attn.to_k", H, 2 * H), ("attn.to_v", 2 * H, 3 * H)]
FLUX_FUSED = {  # kohya module -> [(diffusers module, first row, end row)] of its delta
    "lora_unet_double_blocks_0_img_attn_qkv": [(f"transformer_blocks.0.{m}", a, b) for m, a, b in QKV],
    "lora_unet_double_blocks_0_txt_attn_qkv": [(f"transformer_blocks.0.{m}".replace("to_", "add_") + "_proj", a, b)
                                               for m, a, b in QKV],
    "lora_unet_single_blocks_0_linear1": [(f"single_transformer_blocks.0.{m}", a, b) for m, a, b in QKV]
    + [("single_transformer_blocks.0.proj_mlp", 3 * H, 7 * H)],
    "lora_unet_double_blocks_0_txt_mlp_0": [("transformer_blocks.0.ff_context.net.0.proj", 0, 4 * H)],
    "lora_unet_final_layer_linear": [("proj_out", 0, 64)],
}
SHAPES = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H), "lora_unet_double_blocks_0_txt_attn_qkv": (3 * H, H),
          "lora_unet_single_blocks_0_linear1": (7 * H, H), "lora_unet_double_blocks_0_txt_mlp_0": (4 * H, H),
          "lora_unet_final_layer_linear": (64, H)}
FAMILY_EXTRA = {
    "flux1": ({"lora_unet_time_in_in_layer": (H, 256)},
              {"lora_unet_time_in_in_layer": [("time_text_embed.timestep_embedder.linear_1", 0, H)]}),
    "chroma": ({"lora_unet_distilled_guidance_layer_in_proj": (5120, 64)},
               {"lora_unet_distilled_guidance_layer_in_proj": [("distilled_guidance_layer.in_proj", 0, 5120)]}),
}


def flux_model(family: str):
    common = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56))
    if family == "chroma":
        return meta_model(diffusers.ChromaTransformer2DModel, **common)
    return meta_model(diffusers.FluxTransformer2DModel, pooled_projection_dim=768, guidance_embeds=True, **common)


@needs_shapes
@pytest.mark.parametrize("family", ["flux1", "chroma"])
def test_flux_and_chroma_diffusers_outputs_load(tmp_path, diffusers_warnings, family):
    from diffusers.loaders import FluxLoraLoaderMixin

    extra_shapes, extra_rows = FAMILY_EXTRA[family]
    layout = {**FLUX_FUSED, **extra_rows}
    src = kohya({**SHAPES, **extra_shapes}, seed=3)
    save_tensors(tmp_path / "in.safetensors", src, {"ss_base_model_version": family})
    run_script(convert_lora, ["--to", "diffusers", "--family", family, tmp_path / "in.safetensors",
                              tmp_path / "pytorch_lora_weights.safetensors"])
    want = {}
    for name, parts in layout.items():
        full = dense_delta(src, name)
        want.update({module: full[a:b] for module, a, b in parts})
    assert lora_modules(tmp_path / "pytorch_lora_weights.safetensors") == sorted(want)
    model = flux_model(family)
    base = materialize(model, want, seed=4)
    state, metadata = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, None, transformer=model, adapter_name="t",
                                                   metadata=metadata)
    assert diffusers_warnings == []
    assert_fused(model, base, want)


def test_the_capture_sees_diffusers_key_warnings(diffusers_warnings):
    """The empty-warnings checks above can fail: diffusers' own reporter of unhandled keys lands in the capture."""
    from types import SimpleNamespace

    from diffusers.utils.peft_utils import _maybe_warn_for_unhandled_keys

    _maybe_warn_for_unhandled_keys(SimpleNamespace(unexpected_keys=["blocks.0.x.lora_A.weight"], missing_keys=[]), "t")
    assert any("unexpected keys" in m for m in diffusers_warnings)
