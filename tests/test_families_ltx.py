"""LTX-Video 2B, LTX-2 and LTX-2.3 (issue 16): tables checked against diffusers' own models built on the meta
device, round trips through every format (LTX-2's text `connectors` travelling in the same file), diffusers'
converters and loader mixins as oracle, our diffusers files loaded into tiny models built from a config,
detection, and merges into thinned checkpoints against float64.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import merge_lora
from library.errors import LoraToolsError
from library.formats import FAMILIES, lora_from_tensors, lora_tensors, ltx2, ltx23, ltxv
from library.formats.family import Table, TableBuilder
from library.formats.native_build import build_from_diffusers
from library.safetensors_io import load_tensors, save_tensors
from tests.helpers import (
    LORA_FORMATS,
    assert_round_trips,
    diffusers_fixture,
    probe_deltas,
    run_script,
    write_lora,
)

FAMS = ("ltxv", "ltx2", "ltx23")
CONFIGS = {"ltx2": ltx2.CONFIG, "ltx23": ltx23.CONFIG}
# diffusers' LTX-2 presets (its conversion script's "2.0" / "2.3" configurations) where they differ from the
# model's defaults; only these shape the module list
MODEL_23 = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                use_prompt_embeddings=False, perturbed_attn=True)
CONNECTORS = {"ltx2": dict(caption_channels=3840, text_proj_in_factor=49),
              "ltx23": dict(caption_channels=3840, text_proj_in_factor=49, per_modality_projections=True,
                            video_hidden_dim=4096, audio_hidden_dim=2048, proj_bias=True)}


def _linears(model, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.startswith(skip)}


def _diffusers():
    return pytest.importorskip("diffusers")


def _connectors_cls():
    return pytest.importorskip("diffusers.pipelines.ltx2.connectors").LTX2TextConnectors


def family_modules(family: str) -> dict[str, tuple[int, ...]]:
    """component-prefixed diffusers path -> shape of every module of the shipped table."""
    table = FAMILIES[family].table
    out = {}
    for naming, component in (("diffusers", "transformer"), ("diffusers_connectors", "connectors")):
        for path, slot in table.slots.get(naming, {}).items():
            out[f"{component}.{path}"] = table.shapes[slot.key]
    return out


# ---- the tables -------------------------------------------------------------------------------------------

def test_ltxv_table_is_diffusers_own_model():
    """diffusers' default configuration is the 2B; built at two blocks (28 take long even on the meta device)."""
    with torch.device("meta"):
        model = _diffusers().LTXVideoTransformer3DModel(num_layers=2)
    assert {p: s for p, _k, s, _b in ltxv.diffusers_rows(layers=2)} == _linears(model)
    slots = FAMILIES["ltxv"].table.slots
    assert {p: FAMILIES["ltxv"].table.shapes[s.key] for p, s in slots["diffusers"].items()} == \
        {p: s for p, _k, s, _b in ltxv.diffusers_rows()}
    assert {int(p.split(".")[1]) for p in slots["diffusers"] if p.startswith("transformer_blocks.")} == set(range(28))
    # original names: only the two top-level renames
    assert slots["ltx"]["patchify_proj"].key == "patchify_proj.weight"
    assert slots["diffusers"]["time_embed.linear"].key == "adaln_single.linear.weight"
    assert slots["diffusers"]["transformer_blocks.27.attn2.to_k"].key == "transformer_blocks.27.attn2.to_k.weight"


@pytest.mark.parametrize("family", ["ltx2", "ltx23"])
def test_ltx2_rows_are_diffusers_own_models(family):
    """Our row generator at two blocks equals diffusers' model of that preset at two blocks (the 48-block
    model takes seconds to build even on the meta device); the shipped table is the generator at 48."""
    d = _diffusers()
    config = CONFIGS[family]
    with torch.device("meta"):
        model = d.LTX2VideoTransformer3DModel(num_layers=2, **(MODEL_23 if family == "ltx23" else {}))
        connectors = _connectors_cls()(video_connector_num_layers=1, audio_connector_num_layers=1, **CONNECTORS[family])
    assert ltx2.transformer_rows(replace(config, layers=2)) == _linears(model)
    assert ltx2.connector_rows(config) == _linears(connectors, skip=("video_connector.", "audio_connector."))
    table = FAMILIES[family].table
    shipped = {p: table.shapes[s.key] for p, s in table.slots["diffusers"].items()}
    assert shipped == ltx2.transformer_rows(config)
    assert {int(p.split(".")[1]) for p in shipped if p.startswith("transformer_blocks.")} == set(range(48))
    assert {table.components[k] for k in table.shapes if k.startswith("text_embedding_projection.")} == {"connectors"}
    assert all(k.startswith(("model.diffusion_model.", "text_embedding_projection.")) for k in table.shapes)


def test_ltx2_rename_table():
    slots = FAMILIES["ltx23"].table.slots["diffusers"]
    pairs = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj",
             "time_embed.linear": "adaln_single.linear", "audio_time_embed.linear": "audio_adaln_single.linear",
             "av_cross_attn_video_scale_shift.linear": "av_ca_video_scale_shift_adaln_single.linear",
             "av_cross_attn_audio_v2a_gate.emb.timestep_embedder.linear_1":
                 "av_ca_v2a_gate_adaln_single.emb.timestep_embedder.linear_1",
             "prompt_adaln.linear": "prompt_adaln_single.linear",
             "audio_prompt_adaln.linear": "audio_prompt_adaln_single.linear",
             "transformer_blocks.3.audio_to_video_attn.to_gate_logits": "transformer_blocks.3.audio_to_video_attn.to_gate_logits"}
    for diffusers_path, original in pairs.items():
        assert slots[diffusers_path].key == f"model.diffusion_model.{original}.weight", diffusers_path
    conn = FAMILIES["ltx23"].table.slots["diffusers_connectors"]
    assert conn["video_text_proj_in"].key == "text_embedding_projection.video_aggregate_embed.weight"
    assert FAMILIES["ltx2"].table.slots["diffusers_connectors"]["text_proj_in"].key == \
        "text_embedding_projection.aggregate_embed.weight"
    assert FAMILIES["ltx23"].table.shapes["model.diffusion_model.adaln_single.linear.weight"] == (9 * 4096, 4096)
    assert FAMILIES["ltx2"].table.shapes["model.diffusion_model.adaln_single.linear.weight"] == (6 * 4096, 4096)


# ---- formats ----------------------------------------------------------------------------------------------

def _first_and_last_blocks(family: str) -> dict[str, tuple[int, ...]]:
    """Every top-level module, the connectors, and blocks 0, 1 and the last (the suite runs on 2 cores)."""
    last = str(ltxv.LAYERS - 1 if family == "ltxv" else CONFIGS[family].layers - 1)
    return {k: s for k, s in family_modules(family).items()
            if not k.startswith("transformer.transformer_blocks.") or k.split(".")[2] in ("0", "1", last)}


@pytest.mark.parametrize("start", LORA_FORMATS)
@pytest.mark.parametrize("family", FAMS)
def test_round_trip_through_every_format(family, start):
    assert_round_trips(family, _first_and_last_blocks(family), start)


def test_connectors_names_in_each_format():
    tensors, meta = diffusers_fixture("ltx2", modules={"connectors.text_proj_in": (3840, 188160),
                                                        "transformer.audio_proj_in": (2048, 128)})
    lora = lora_from_tensors(tensors, meta)
    assert lora.family == "ltx2" and {m.target.component for m in lora.modules} == {"connectors", "transformer"}
    names = {fmt: sorted(lora_tensors(lora.modules, "ltx2", fmt)[0]) for fmt in LORA_FORMATS}
    assert "lora_unet_text_embedding_projection_aggregate_embed.lora_down.weight" in names["kohya"]
    assert "lora_unet_audio_patchify_proj.lora_down.weight" in names["kohya"]
    assert "text_embedding_projection.aggregate_embed.lora_A.weight" in names["ai-toolkit"]
    assert "diffusion_model.audio_patchify_proj.lora_A.weight" in names["ai-toolkit"]
    assert "text_embedding_projection.aggregate_embed.lora_down.weight" in names["comfy"]
    # Lightricks' own files put the projection under `diffusion_model.` as well: read as the connectors
    official = {"diffusion_model." + k: v for k, v in lora_tensors(lora.modules, "ltx2", "ai-toolkit")[0].items()
                if k.startswith("text_embedding_projection.")}
    back = lora_from_tensors(official, {})
    assert back.family == "ltx2" and [m.target.key for m in back.modules] == ["text_embedding_projection.aggregate_embed.weight"]


# ---- diffusers as oracle ----------------------------------------------------------------------------------

def _scale_one_fixture(modules: dict[str, tuple[int, ...]], seed: int = 5) -> tuple[dict, dict]:
    """PEFT tensors with alpha = rank (scale 1), so that AI-Toolkit's baked factors are the stored ones."""
    tensors, meta = diffusers_fixture("ltx2", seed=seed, modules=modules)
    import json
    config = json.loads(meta["lora_adapter_metadata"])
    for key in list(config):
        if key.endswith(".lora_alpha"):
            config[key] = float(config[key.replace(".lora_alpha", ".r")])
        elif key.endswith(".alpha_pattern"):
            config[key] = {}
    return tensors, {"lora_adapter_metadata": json.dumps(config)}


@pytest.mark.parametrize("family", ["ltx2", "ltx23"])
def test_ltx2_mixin_reads_our_ai_toolkit_file_as_our_diffusers_file(family):
    """LTX2LoraLoaderMixin.lora_state_dict on our original-names file (transformer under `diffusion_model.`,
    connectors bare) gives exactly our diffusers file: same keys (transformer.* and connectors.*), same tensors."""
    mixin = pytest.importorskip("diffusers.loaders.lora_pipeline").LTX2LoraLoaderMixin
    tensors, meta = _scale_one_fixture(family_modules(family))
    lora = lora_from_tensors(tensors, meta, family=family)
    ait, _ = lora_tensors(lora.modules, family, "ai-toolkit")
    ours, _ = lora_tensors(lora.modules, family, "diffusers")
    theirs = mixin.lora_state_dict({k: v.clone() for k, v in ait.items()})
    assert sorted(theirs) == sorted(ours)
    assert any(k.startswith("connectors.") for k in ours) and any(".audio_to_video_attn." in k for k in ours)
    for key in ours:
        assert theirs[key].equal(ours[key]), key


def test_ltx2_official_connector_spelling_is_misrouted_by_diffusers():
    """diffusers 0.42.1 (noted here): a projection LoRA under `diffusion_model.text_embedding_projection.` (the
    spelling of Lightricks' files) comes out of its converter as `transformer.text_embedding_projection.…`, a
    module its transformer lacks; we read it as the connectors' `text_proj_in`."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    g = torch.Generator().manual_seed(2)
    src = {"diffusion_model.text_embedding_projection.aggregate_embed.lora_A.weight": torch.randn(2, 188160, generator=g),
           "diffusion_model.text_embedding_projection.aggregate_embed.lora_B.weight": torch.randn(3840, 2, generator=g)}
    theirs = conv._convert_non_diffusers_ltx2_lora_to_diffusers(dict(src))
    assert sorted(theirs) == ["transformer.text_embedding_projection.aggregate_embed.lora_A.weight",
                              "transformer.text_embedding_projection.aggregate_embed.lora_B.weight"]
    ours, _ = lora_tensors(lora_from_tensors(src, {}).modules, "ltx2", "diffusers")
    assert sorted(ours) == ["connectors.text_proj_in.lora_A.weight", "connectors.text_proj_in.lora_B.weight"]


def test_ltxv_converter_is_one_to_one_and_misses_the_top_level_renames():
    """diffusers' LTX-Video converter maps `diffusion_model.` to `transformer.` 1:1: on the blocks that is our
    diffusers file exactly; `patchify_proj` / `adaln_single` keep their original names there (diffusers 0.42.1,
    noted here), which LTXVideoTransformer3DModel calls `proj_in` / `time_embed`, as we write them."""
    mixin = pytest.importorskip("diffusers.loaders.lora_pipeline").LTXVideoLoraLoaderMixin
    tensors, meta = _scale_one_fixture({k: s for k, s in family_modules("ltxv").items()})
    lora = lora_from_tensors(tensors, meta)
    assert lora.family == "ltxv"
    ait, _ = lora_tensors(lora.modules, "ltxv", "ai-toolkit")
    ours, _ = lora_tensors(lora.modules, "ltxv", "diffusers")
    theirs = mixin.lora_state_dict({k: v.clone() for k, v in ait.items()})
    top = ("transformer.proj_in.", "transformer.time_embed.")
    for key, value in ours.items():
        if key.startswith(top):
            original = key.replace("transformer.proj_in.", "transformer.patchify_proj.") \
                .replace("transformer.time_embed.", "transformer.adaln_single.")
            assert theirs[original].equal(value) and key not in theirs
        else:
            assert theirs[key].equal(value), key
    assert len(theirs) == len(ours)


# ---- loading our diffusers files into tiny diffusers models -----------------------------------------------

TINY_LTXV = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=24,
                 num_layers=2, caption_channels=12)
TINY_LTX2 = ltx2.Config(heads=2, head_dim=8, cross=24, audio_heads=2, audio_head_dim=4, audio_cross=12, channels=8,
                        audio_channels=6, caption=10, text_layers=3, layers=2)


def _tiny_ltx2_models(config: ltx2.Config):
    d = _diffusers()
    model = d.LTX2VideoTransformer3DModel(
        in_channels=config.channels, out_channels=config.channels, num_attention_heads=config.heads,
        attention_head_dim=config.head_dim, cross_attention_dim=config.cross, audio_in_channels=config.audio_channels,
        audio_out_channels=config.audio_channels, audio_num_attention_heads=config.audio_heads,
        audio_attention_head_dim=config.audio_head_dim, audio_cross_attention_dim=config.audio_cross,
        num_layers=config.layers, caption_channels=config.caption,
        **(MODEL_23 if config.cross_attn_mod else {}))
    extra = dict(per_modality_projections=True, video_hidden_dim=config.dim, audio_hidden_dim=config.audio_dim,
                 proj_bias=True) if config.per_modality_projections else {}
    connectors = _connectors_cls()(caption_channels=config.caption, text_proj_in_factor=config.text_layers,
                                   video_connector_num_attention_heads=2, video_connector_attention_head_dim=5,
                                   video_connector_num_layers=1, video_connector_num_learnable_registers=None,
                                   audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=5,
                                   audio_connector_num_layers=1, audio_connector_num_learnable_registers=None, **extra)
    return {"transformer": model, "connectors": connectors}


def _tiny_family(monkeypatch, base: str, name: str, build) -> None:
    builder = TableBuilder()
    build(builder)
    fam = replace(FAMILIES[base], name=name)
    fam.__dict__["table"] = Table(builder.to_json())  # the cached table of the tiny widths
    monkeypatch.setitem(FAMILIES, name, fam)


def _effective_delta(layer) -> torch.Tensor:
    return layer.get_delta_weight("default_0").double()


@pytest.mark.parametrize("family", FAMS)
def test_our_diffusers_file_loads_into_a_tiny_model(family, monkeypatch, tmp_path):
    """Every Linear of a tiny model (LTX-2: transformer and connectors' projections) gets a LoRA; we read it,
    write the original names (AI-Toolkit), read that, write diffusers, and diffusers' loader puts it on exactly
    those modules with ΔW = (alpha/r)·B·A of the first file (1e-5)."""
    pytest.importorskip("peft")
    mixin = pytest.importorskip("diffusers.loaders.lora_pipeline").LTX2LoraLoaderMixin
    torch.manual_seed(0)
    name = f"{family}_tiny"
    if family == "ltxv":
        models = {"transformer": _diffusers().LTXVideoTransformer3DModel(**TINY_LTXV)}
        rows = ltxv.diffusers_rows(dim=16, cross=24, caption=12, channels=8, layers=2)
        _tiny_family(monkeypatch, "ltxv", name, lambda b: build_from_diffusers(b, rows, ltxv.inverse_rule, native="ltx"))
    else:
        config = replace(TINY_LTX2, gated=True, cross_attn_mod=True, prompt_embeddings=False,
                         per_modality_projections=True) if family == "ltx23" else TINY_LTX2
        models = _tiny_ltx2_models(config)
        _tiny_family(monkeypatch, family, name, lambda b: ltx2.build_config(b, config))
    modules = {f"{c}.{n}": s for c, m in models.items()
               for n, s in _linears(m, skip=("video_connector.", "audio_connector.")).items()}
    tensors, meta = diffusers_fixture(family, seed=3, modules=modules)
    if family == "ltxv":
        assert sorted(modules) == sorted("transformer." + p for p, *_ in rows)
    lora = lora_from_tensors(tensors, meta, family=name)
    ait, ait_meta = lora_tensors(lora.modules, name, "ai-toolkit")
    again = lora_from_tensors(ait, ait_meta, family=name)
    ours, ours_meta = lora_tensors(again.modules, name, "diffusers")
    assert sorted(ours) == sorted(tensors)  # the same diffusers names as the model's own
    path = write_lora(str(tmp_path / "ours.safetensors"), ours, ours_meta)
    state, adapter_meta = mixin.lora_state_dict(path, return_lora_metadata=True)
    base = {c: {n: m.weight.detach().double().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)} for c, model in models.items()}
    expected = probe_deltas(tensors, meta)
    for component, model in models.items():
        part = {k: v for k, v in state.items() if k.startswith(component + ".")}
        model.load_lora_adapter(part, prefix=component, metadata=adapter_meta, adapter_name="default_0")
        lora_layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
        want = {k[len(component) + 1:] for k in expected if k.startswith(component + ".")}
        assert set(lora_layers) == want  # no module missing, none unexpected
        for n, layer in lora_layers.items():
            assert layer.base_layer.weight.double().equal(base[component][n])
            delta = _effective_delta(layer).detach()
            x = torch.randn(delta.shape[1], 2, generator=torch.Generator().manual_seed(7 + delta.shape[1]),
                            dtype=torch.float64)
            want_dx = expected[f"{component}.{n}"]
            err = float((delta @ x - want_dx).norm() / want_dx.norm())
            assert err < 1e-5, (n, err)


# ---- detection --------------------------------------------------------------------------------------------

def _pair(name: str, out: int, inp: int, g: torch.Generator, peft: bool = True) -> dict[str, torch.Tensor]:
    a, b = ("lora_A.weight", "lora_B.weight") if peft else ("lora_down.weight", "lora_up.weight")
    return {f"{name}.{a}": torch.randn(2, inp, generator=g) * 0.1, f"{name}.{b}": torch.randn(out, 2, generator=g) * 0.1}


def test_detection_by_keys_and_widths():
    g = torch.Generator().manual_seed(1)
    video = _pair("diffusion_model.transformer_blocks.0.attn1.to_q", 4096, 4096, g)
    assert lora_from_tensors(_pair("diffusion_model.transformer_blocks.0.attn1.to_q", 2048, 2048, g), {}).family == "ltxv"
    assert lora_from_tensors(video, {}).family == "ltx2"  # blocks alone: LTX-2 unless the metadata says 2.3
    assert lora_from_tensors(video, {"ss_base_model_version": "ltx-2.3"}).family == "ltx23"
    assert lora_from_tensors(video, {"modelspec.architecture": "ltx-2/lora"}).family == "ltx2"
    gate = {**video, **_pair("diffusion_model.transformer_blocks.0.attn1.to_gate_logits", 32, 4096, g)}
    assert lora_from_tensors(gate, {}).family == "ltx23"  # gated attention is LTX-2.3's own
    mod9 = {**video, **_pair("lora_unet_adaln_single_linear", 9 * 4096, 4096, g, peft=False)}
    assert lora_from_tensors(mod9, {}).family == "ltx23"
    caption = {**video, **_pair("transformer.caption_projection.linear_1", 4096, 3840, g)}
    with pytest.raises(LoraToolsError, match="map to no target"):
        lora_from_tensors(caption, {}, family="ltx23")  # LTX-2.3 has no caption projection in the transformer


# ---- merges into thinned checkpoints ----------------------------------------------------------------------

def _merged(base: dict, out: dict, key: str, lora: dict, module: str, ratio: float, scale: float = 1.0) -> None:
    down = lora[f"{module}.lora_down.weight"].double()
    up = lora[f"{module}.lora_up.weight"].double()
    want = base[key].double() + ratio * scale * up @ down
    assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, key


def test_ltx2_merge_into_a_thinned_official_checkpoint(tmp_path):
    """A musubi-style LoRA (audio, cross-modal and modulation modules) into the official single-file layout
    (`model.diffusion_model.` + original names); the other tensors are copied bit for bit."""
    g = torch.Generator().manual_seed(6)
    p = "model.diffusion_model."
    shapes = {p + "transformer_blocks.5.audio_attn1.to_q.weight": (2048, 2048),
              p + "transformer_blocks.5.video_to_audio_attn.to_k.weight": (2048, 4096),
              p + "audio_patchify_proj.weight": (2048, 128),
              p + "av_ca_v2a_gate_adaln_single.linear.weight": (2048, 2048),
              p + "audio_proj_out.weight": (128, 2048), p + "audio_proj_out.bias": (128,),
              "vae.per_channel_statistics.mean-of-means": (128,)}
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    save_tensors(tmp_path / "ltx2.safetensors", base)
    modules = {"lora_unet_transformer_blocks_5_audio_attn1_to_q": ("transformer_blocks.5.audio_attn1.to_q", 2048, 2048),
               "lora_unet_transformer_blocks_5_video_to_audio_attn_to_k":
                   ("transformer_blocks.5.video_to_audio_attn.to_k", 2048, 4096),
               "lora_unet_audio_patchify_proj": ("audio_patchify_proj", 2048, 128),
               "lora_unet_av_ca_v2a_gate_adaln_single_linear": ("av_ca_v2a_gate_adaln_single.linear", 2048, 2048)}
    lora = {}
    for name, (_path, o, i) in modules.items():
        lora.update(_pair(name, o, i, g, peft=False))
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "ltx2.safetensors", "--models", tmp_path / "l.safetensors",
                            "--ratios", "0.7", "--family", "ltx2", "--save_to", tmp_path / "o.safetensors"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    for name, (path, _o, _i) in modules.items():
        _merged(base, out, p + path + ".weight", lora, name, 0.7, scale=0.5)  # alpha 1, rank 2
    for key in (p + "audio_proj_out.weight", p + "audio_proj_out.bias", "vae.per_channel_statistics.mean-of-means"):
        assert out[key].equal(base[key])


def test_ltxv_merge_into_a_thinned_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(8)
    p = "model.diffusion_model."
    base = {p + "transformer_blocks.3.attn2.to_k.weight": torch.randn(2048, 2048, generator=g) * 0.05,
            p + "patchify_proj.weight": torch.randn(2048, 128, generator=g) * 0.05}
    save_tensors(tmp_path / "ltxv.safetensors", base)
    lora = {**_pair("transformer.transformer_blocks.3.attn2.to_k", 2048, 2048, g),
            **_pair("transformer.proj_in", 2048, 128, g)}
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "ltxv.safetensors", "--models", tmp_path / "l.safetensors",
                            "--ratios", "1.5", "--family", "ltxv", "--save_to", tmp_path / "o.safetensors"])
    out, _ = load_tensors(tmp_path / "o.safetensors")
    for key, module in ((p + "transformer_blocks.3.attn2.to_k.weight", "transformer.transformer_blocks.3.attn2.to_k"),
                        (p + "patchify_proj.weight", "transformer.proj_in")):
        want = base[key].double() + 1.5 * lora[f"{module}.lora_B.weight"].double() @ lora[f"{module}.lora_A.weight"].double()
        assert float((out[key].double() - want).norm() / want.norm()) < 1e-6, key


def test_ltx2_lora_into_ltx23_checkpoint_drops_what_23_lacks(tmp_path, capsys):
    g = torch.Generator().manual_seed(9)
    p = "model.diffusion_model."
    key = p + "transformer_blocks.0.audio_attn1.to_q.weight"
    base = {key: torch.randn(2048, 2048, generator=g) * 0.05,
            p + "transformer_blocks.0.attn1.to_gate_logits.weight": torch.randn(32, 4096, generator=g)}
    save_tensors(tmp_path / "ltx23.safetensors", base)
    lora = {**_pair("diffusion_model.transformer_blocks.0.audio_attn1.to_q", 2048, 2048, g),
            **_pair("diffusion_model.caption_projection.linear_1", 4096, 3840, g)}  # LTX-2's own module
    save_tensors(tmp_path / "l.safetensors", lora)
    run_script(merge_lora, ["--sd_model", tmp_path / "ltx23.safetensors", "--models", tmp_path / "l.safetensors",
                            "--family", "ltx23", "--save_to", tmp_path / "o.safetensors"])
    assert "caption_projection.linear_1" in capsys.readouterr().out
    out, _ = load_tensors(tmp_path / "o.safetensors")
    want = base[key].double() + lora["diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_B.weight"].double() @ \
        lora["diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight"].double()
    assert float((out[key].double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.parametrize(("lora_family", "checkpoint_family", "words"), [
    ("wan21", "ltx2", "a Wan 2.1 14B LoRA does not apply to LTX-2"),
    ("ltxv", "ltx2", "a LTX-Video 2B LoRA does not apply to LTX-2"),
    ("ltx23", "ltx2", "a LTX-2.3 LoRA does not apply to LTX-2"),
    ("ltx2", "ltxv", "a LTX-2 LoRA does not apply to LTX-Video 2B"),
])
def test_other_family_lora_into_ltx_checkpoint_names_both(tmp_path, lora_family, checkpoint_family, words):
    g = torch.Generator().manual_seed(10)
    loras = {"wan21": _pair("diffusion_model.blocks.0.self_attn.q", 5120, 5120, g),
             "ltxv": _pair("diffusion_model.transformer_blocks.0.attn1.to_q", 2048, 2048, g),
             "ltx23": _pair("diffusion_model.transformer_blocks.0.attn1.to_gate_logits", 32, 4096, g),
             "ltx2": _pair("diffusion_model.caption_projection.linear_1", 4096, 3840, g)}
    checkpoints = {"ltx2": {"model.diffusion_model.transformer_blocks.0.audio_attn1.to_q.weight": torch.zeros(2048, 2048)},
                   "ltxv": {"model.diffusion_model.transformer_blocks.0.attn1.to_q.weight": torch.zeros(2048, 2048)}}
    save_tensors(tmp_path / "ck.safetensors", checkpoints[checkpoint_family])
    save_tensors(tmp_path / "l.safetensors", loras[lora_family])
    with pytest.raises(LoraToolsError, match=f"for {lora_family} but the checkpoint is {checkpoint_family}: {words}"):
        run_script(merge_lora, ["--sd_model", tmp_path / "ck.safetensors", "--models", tmp_path / "l.safetensors",
                                "--family", checkpoint_family, "--save_to", tmp_path / "o.safetensors"])
    assert not (tmp_path / "o.safetensors").exists()



def test_convert_lora_script_writes_both_components_for_diffusers(tmp_path):
    """convert_lora.py on a musubi-style LTX-2 file (transformer and connectors): diffusers' LTX-2 loader reads
    the output file with both components and our alphas."""
    import convert_lora

    mixin = pytest.importorskip("diffusers.loaders.lora_pipeline").LTX2LoraLoaderMixin
    g = torch.Generator().manual_seed(12)
    src = {**_pair("lora_unet_transformer_blocks_0_audio_attn2_to_k", 2048, 2048, g, peft=False),
           **_pair("lora_unet_text_embedding_projection_aggregate_embed", 3840, 188160, g, peft=False),
           "lora_unet_transformer_blocks_0_audio_attn2_to_k.alpha": torch.tensor(1.0),
           "lora_unet_text_embedding_projection_aggregate_embed.alpha": torch.tensor(1.0)}
    save_tensors(tmp_path / "k.safetensors", src)
    run_script(convert_lora, ["--to", "diffusers", tmp_path / "k.safetensors", tmp_path / "d.safetensors"])
    state, meta = mixin.lora_state_dict(str(tmp_path / "d.safetensors"), return_lora_metadata=True)
    assert sorted(state) == ["connectors.text_proj_in.lora_A.weight", "connectors.text_proj_in.lora_B.weight",
                             "transformer.transformer_blocks.0.audio_attn2.to_k.lora_A.weight",
                             "transformer.transformer_blocks.0.audio_attn2.to_k.lora_B.weight"]
    assert meta["connectors.lora_alpha"] == 1.0 and meta["connectors.r"] == 2
    assert state["connectors.text_proj_in.lora_A.weight"].equal(
        src["lora_unet_text_embedding_projection_aggregate_embed.lora_down.weight"])
