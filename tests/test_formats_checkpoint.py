"""Base checkpoints: family detection from keys and shapes, canonical target ↔ checkpoint key placement, block ids."""

from __future__ import annotations

import pytest

from library.formats import FAMILIES, Target, block_id, detect_checkpoint_family
from library.formats.checkpoint import CheckpointLayout, detect_checkpoint_layout
from tests.test_formats_fixtures import needs_shapes, rows


class FakeReader:
    """keys() and shape() of a checkpoint, without tensors."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.path = "fake.safetensors"

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def canonical(family: str, prefix: str = "", strip: str = "") -> FakeReader:
    table = FAMILIES[family].table
    return FakeReader({prefix + k.removeprefix(strip): s for k, s in table.shapes.items()})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux1"])
def test_single_file_checkpoints_are_detected(family):
    assert detect_checkpoint_family(canonical(family)) == family


def test_prefixed_and_unet_only_layouts():
    assert detect_checkpoint_family(canonical("flux1", prefix="model.diffusion_model.")) == "flux1"
    unet_only = FakeReader({k.removeprefix("model.diffusion_model."): s for k, s in FAMILIES["sdxl"].table.shapes.items()
                            if k.startswith("model.diffusion_model.")})
    layout = detect_checkpoint_layout(unet_only)
    assert layout.family.name == "sdxl" and layout.strip == "model.diffusion_model."


@needs_shapes
def test_diffusers_layouts_are_detected_from_the_reference_lists():
    flux = FakeReader({p + ".weight": s for p, s in rows("flux1_dev")})
    layout = detect_checkpoint_layout(flux)
    assert (layout.family.name, layout.naming) == ("flux1", "diffusers")
    sd1 = FakeReader({p + ".weight": s for p, s in rows("sd15_unet")})
    assert detect_checkpoint_family(sd1) == "sd1"
    sd2 = FakeReader({p + ".weight": s for p, s in rows("sd21_unet")})
    assert detect_checkpoint_family(sd2) == "sd2"  # same names as SD1; shapes decide


def test_unknown_checkpoint_is_none():
    assert detect_checkpoint_family(FakeReader({"a.weight": (3, 3), "b.weight": (4,)})) is None


def test_flux_diffusers_layout_places_fused_rows():
    layout = CheckpointLayout("flux1", naming="diffusers")
    qkv = Target("double_blocks.0.img_attn.qkv.weight", None, "transformer", (9216, 3072))
    placed = layout.placements(qkv)
    assert [(p.checkpoint_key, p.checkpoint_rows, p.target_rows) for p in placed] == [
        ("transformer_blocks.0.attn.to_q.weight", None, (0, 3072)),
        ("transformer_blocks.0.attn.to_k.weight", None, (3072, 6144)),
        ("transformer_blocks.0.attn.to_v.weight", None, (6144, 9216))]
    k_only = Target("double_blocks.0.img_attn.qkv.weight", (3072, 6144), "transformer", (3072, 3072))
    assert [(p.checkpoint_key, p.checkpoint_rows, p.target_rows) for p in layout.placements(k_only)] == [
        ("transformer_blocks.0.attn.to_k.weight", None, None)]
    final = Target("final_layer.adaLN_modulation.1.weight", None, "transformer", (6144, 3072))
    assert layout.placements(final)[0].swap and layout.placements(final)[0].checkpoint_key == "norm_out.linear.weight"
    inverse = layout.targets(["single_transformer_blocks.3.proj_mlp.weight", "norm_out.linear.weight", "nope"])
    assert inverse["single_transformer_blocks.3.proj_mlp.weight"][0] == Target(
        "single_blocks.3.linear1.weight", (9216, 21504), "transformer", (12288, 3072))
    assert inverse["norm_out.linear.weight"][1] is True and "nope" not in inverse


def test_sdxl_te2_q_is_a_slice_of_in_proj():
    layout = CheckpointLayout("sdxl")
    q = Target("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", (0, 1280), "te2", (1280, 1280))
    (p,) = layout.placements(q)
    assert (p.checkpoint_key, p.checkpoint_rows) == (q.key, (0, 1280))
    inverse = layout.targets([q.key])
    assert inverse[q.key][0].shape == (3840, 1280) and inverse[q.key][0].rows is None


@pytest.mark.parametrize(("family", "key", "block"), [
    ("sd1", "model.diffusion_model.input_blocks.0.0.weight", "IN00"),
    ("sd1", "model.diffusion_model.input_blocks.11.0.in_layers.2.weight", "IN11"),
    ("sd1", "model.diffusion_model.middle_block.1.proj_in.weight", "M00"),
    ("sd1", "model.diffusion_model.output_blocks.11.1.proj_out.weight", "OUT11"),
    ("sd1", "model.diffusion_model.time_embed.0.weight", None),
    ("sd1", "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
    ("sdxl", "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "IN08"),
    ("sdxl", "model.diffusion_model.output_blocks.8.0.skip_connection.weight", "OUT08"),
    ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "BASE"),
    ("flux1", "double_blocks.18.img_attn.qkv.weight", "D18"),
    ("flux1", "single_blocks.37.linear2.weight", "S37"),
    ("flux1", "final_layer.linear.weight", None),
    ("flux1", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight", "BASE"),
])
def test_block_ids(family, key, block):
    assert key in FAMILIES[family].table.shapes
    assert block_id(family, key) == block
