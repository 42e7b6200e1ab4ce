"""Every family × every written format: A → B → A keeps the key set bit for bit and every delta.

Fixtures carry the real module names and shapes of each family (rank 2); deltas are compared per
module on random probes in float64 (tests/test_formats_fixtures.py), independently of our tables.
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from library.formats import lora_from_tensors, lora_tensors
from tests.test_formats_fixtures import assert_same_deltas, diffusers_fixture, kohya_fixture, needs_shapes, probe_deltas

FAMILIES = ("sd1", "sd2", "sdxl", "flux1")
FORMATS = ("kohya", "diffusers", "ai-toolkit", "comfy")


@lru_cache(maxsize=8)
def start(family: str, fmt: str):
    """A file of `family` in format `fmt`: built by hand for kohya and diffusers, by our writer otherwise."""
    if fmt == "kohya":
        return kohya_fixture(family), {}
    if fmt == "diffusers":
        return diffusers_fixture(family)
    tensors = kohya_fixture(family)
    out, meta = lora_tensors(lora_from_tensors(tensors).modules, family, fmt)
    return out, meta


def convert(tensors, meta, family, fmt):
    lora = lora_from_tensors(tensors, meta)
    assert lora.family == family
    return lora_tensors(lora.modules, family, fmt)


@needs_shapes
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("a", FORMATS)
def test_round_trip_through_every_format(family, a):
    tensors, meta = start(family, a)
    expected = probe_deltas(tensors, meta)
    for b in FORMATS:
        if b == a:
            continue
        mid, mid_meta = convert(tensors, meta, family, b)
        back, back_meta = convert(mid, mid_meta, family, a)
        assert sorted(back) == sorted(tensors), f"{a} -> {b} -> {a} changed the key set"
        for key, value in tensors.items():
            assert back[key].shape == value.shape, key
        assert_same_deltas(expected, probe_deltas(back, back_meta))


@needs_shapes
@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_and_comfy_are_pure_renames(family):
    # Same factors, same alphas: the tensors themselves must come back bit for bit.
    tensors, _ = start(family, "kohya")
    comfy, meta = convert(tensors, {}, family, "comfy")
    back, _ = convert(comfy, meta, family, "kohya")
    assert all(back[k].dtype == v.dtype and back[k].equal(v) for k, v in tensors.items())
