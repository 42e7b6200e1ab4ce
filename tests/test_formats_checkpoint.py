"""Base checkpoints: family detection from keys and shapes, canonical target ↔ checkpoint key placement, block ids."""

from __future__ import annotations

import pytest

from library.formats import FAMILIES, Target, block_id, detect_checkpoint_family
from library.formats.checkpoint import CheckpointLayout, detect_checkpoint_layout
from tests.helpers import needs_shapes, rows


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


def _main_keys(layout: CheckpointLayout, blocks: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """checkpoint key -> stored shape of the main weights of `layout` whose canonical key starts with `blocks`."""
    table = layout.family.table
    out = {}
    for key, comp in table.components.items():
        if comp in ("unet", "transformer") and key.startswith(blocks):
            for p in layout.placements(Target(key, None, comp, table.shapes[key])):
                rows = p.checkpoint_rows or p.target_rows
                full = table.shapes[key]
                out[p.checkpoint_key] = (rows[1] - rows[0], *full[1:]) if rows else full
    return out


def test_partial_layout_of_a_pruned_flux_in_diffusers_layout():
    from library.formats.checkpoint import partial_layout

    diffusers = CheckpointLayout("flux1", naming="diffusers")
    reader = FakeReader(_main_keys(diffusers, ("double_blocks.0.", "single_blocks.0.")))
    assert detect_checkpoint_layout(reader, "flux1") is None  # 2 of 57 blocks: no majority
    assert partial_layout(reader, "flux1").name == "flux1:diffusers"
    assert partial_layout(reader, "flux1", min_main_keys=4).name == "flux1:diffusers"


def test_partial_layout_prefers_exact_shapes_over_key_count():
    from library.formats.checkpoint import partial_layout

    # Many canonical keys at scaled-down widths, fewer diffusers keys at their real widths: shapes decide.
    canon = {k: (8, 8) for k in _main_keys(CheckpointLayout("flux1"), ("double_blocks.",))}
    real = _main_keys(CheckpointLayout("flux1", naming="diffusers"), ("single_blocks.0.",))
    assert len(canon) > len(real)
    assert partial_layout(FakeReader({**canon, **real}), "flux1").name == "flux1:diffusers"
    # With no exact shape anywhere, the layout with most keys wins (a small test model).
    small = {k: (4, 4) for k in real}
    assert partial_layout(FakeReader({**canon, **small}), "flux1").name == "flux1:canonical"


def test_partial_layout_unet_only_bare_keys_text_encoder_only_and_nothing():
    from library.formats.checkpoint import partial_layout

    table = FAMILIES["sd1"].table
    bare = {k.removeprefix("model.diffusion_model."): (2, 2) for k in table.shapes
            if k.startswith("model.diffusion_model.input_blocks.1.")}
    assert partial_layout(FakeReader(bare), "sd1").name == "sd1:canonical"
    assert partial_layout(FakeReader(bare), "sd1").strip == "model.diffusion_model."
    te_only = FakeReader({k: s for k, s in FAMILIES["flux1"].table.shapes.items() if k.startswith("text_encoders.")})
    assert partial_layout(te_only, "flux1").name == "flux1:canonical"  # extract: a text encoder on its own
    assert partial_layout(te_only, "flux1", min_main_keys=4) is None  # flux_merge: needs the transformer
    assert partial_layout(FakeReader({"some.other.weight": (3, 3)}), "sd1") is None
