"""Lumina-Image 2.0 (issue 16): the uneven (GQA) fused qkv. Its table is checked against diffusers' own
Lumina2Transformer2DModel built on the meta device; diffusers' Lumina2 LoRA converter is the oracle."""

from __future__ import annotations

import pytest
import torch

from library.formats import FAMILIES, lora_from_tensors, lora_tensors
from tests.helpers import LORA_FORMATS, assert_round_trips, assert_same_deltas, probe_deltas

FORMATS = LORA_FORMATS


def lumina_modules() -> dict[str, tuple[int, ...]]:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.Lumina2Transformer2DModel()
    return {"transformer." + n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_table_is_diffusers_own_model():
    modules = lumina_modules()
    table = FAMILIES["lumina2"].table
    slots = table.slots["diffusers"]
    assert {"transformer." + p for p in slots} == set(modules)
    for path, slot in slots.items():
        full = table.shapes[slot.key]
        assert ((slot.rows[1] - slot.rows[0], *full[1:]) if slot.rows else full) == modules["transformer." + path]
    assert [s.rows for _, s in table.by_key["diffusers"]["layers.25.attention.qkv.weight"]] == \
        [(0, 2304), (2304, 3072), (3072, 3840)]
    assert "context_refiner.1.adaLN_modulation.1.weight" not in table.shapes


@pytest.mark.parametrize("a", FORMATS)
def test_round_trip_through_every_format(a):
    assert_round_trips("lumina2", lumina_modules(), a)


def test_uneven_fused_qkv_against_diffusers_converter():
    """A fused (not block-diagonal) qkv LoRA, as sd-scripts' lora_lumina and ComfyUI write it: our diffusers split
    and diffusers' own converter give the same q/k/v deltas, cut [2304, 768, 768]."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    # diffusers' converter wants complete blocks: every module of layers 0-1 and of the two refiners of each kind
    for stack, n, norm in (("layers", 2, True), ("noise_refiner", 2, True), ("context_refiner", 2, False)):
        for i in range(n):
            mods = {"attention.qkv": (3840, 2304), "attention.out": (2304, 2304), "feed_forward.w1": (9216, 2304),
                    "feed_forward.w2": (2304, 9216), "feed_forward.w3": (9216, 2304)}
            if norm:
                mods["adaLN_modulation.1"] = (9216, 1024)
            for m, (o, inp) in mods.items():
                tensors[f"diffusion_model.{stack}.{i}.{m}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.1
                tensors[f"diffusion_model.{stack}.{i}.{m}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.1
    lora = lora_from_tensors(tensors, {})
    assert lora.family == "lumina2"
    ours, ours_meta = lora_tensors(lora.modules, "lumina2", "diffusers")
    assert ours["transformer.layers.1.attn.to_k.lora_B.weight"].shape == (768, 4)
    assert ours["transformer.layers.1.attn.to_q.lora_A.weight"].equal(ours["transformer.layers.1.attn.to_v.lora_A.weight"])
    theirs = conv._convert_non_diffusers_lumina2_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    assert_same_deltas(probe_deltas(ours, ours_meta), probe_deltas(theirs), rel=1e-6)
    # and back to the fused original names: the same file
    back, back_meta = lora_tensors(lora_from_tensors(ours, ours_meta).modules, "lumina2", "ai-toolkit")
    assert sorted(back) == sorted(tensors)
    assert_same_deltas(probe_deltas(tensors), probe_deltas(back, back_meta))
