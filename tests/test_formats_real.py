"""Real LoRA files made by other tools (../shared/data): detection, conversion to kohya and back, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from library.errors import LoraToolsError
from library.formats import detect_lora, lora_from_tensors, lora_tensors, read_lora
from library.formats.match import detect
from library.safetensors_io import load_tensors
from tests.helpers import SHARED_DATA, assert_same_deltas, probe_deltas

DATA = SHARED_DATA
LORAS = os.path.join(DATA, "real-loras")
KEYMAPS = os.path.join(DATA, "real-keymaps")
needs_data = pytest.mark.skipif(not os.path.isdir(LORAS), reason=f"real files not found at {LORAS}")

EXPECTED = {
    "LyCORIS__smart_falcon_4_lokr.safetensors": ("sd1", "kohya", 350),
    "catundchat_sd15-lora__pytorch_lora_weights.safetensors": ("sd1", "diffusers-old", 128),
    "timohavdk_sd-lora__2100-lora.safetensors": ("sd1", "diffusers-old", 128),
}
MALFORMED = "timohavdk_sd-lora__new.safetensors"


@needs_data
def test_every_real_file_is_known_to_this_test():
    assert set(os.listdir(LORAS)) == set(EXPECTED) | {MALFORMED}


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_is_detected(name):
    family, fmt, modules = EXPECTED[name]
    tensors, metadata = load_tensors(os.path.join(LORAS, name))
    assert detect_lora({k: tuple(v.shape) for k, v in tensors.items()}, metadata) == (family, fmt)
    lora = read_lora(os.path.join(LORAS, name))
    assert (lora.family, lora.format, len(lora.modules)) == (family, fmt, modules)


def _old_diffusers_module(key: str) -> str:
    """diffusers module path of an old-diffusers key, by the rules of formats.md §2.1 written out here."""
    key = key.removeprefix("unet.")
    for tail in (".lora.down.weight", ".lora.up.weight"):
        if key.endswith(tail):
            return key[: -len(tail)]
    parent, _, rest = key.partition(".processor.")
    name = rest.split("_lora.")[0]
    return f"{parent}.{'to_out.0' if name == 'to_out' else name}"


@needs_data
@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if EXPECTED[n][1] == "diffusers-old"])
def test_old_diffusers_file_converts_to_kohya_and_back(name):
    tensors, _ = load_tensors(os.path.join(LORAS, name))
    # Expected: kohya SD1 names are `lora_unet_` + the flattened diffusers path; old diffusers has no alpha.
    expected = {}
    for key, value in tensors.items():
        module = "lora_unet_" + _old_diffusers_module(key).replace(".", "_")
        suffix = "lora_down.weight" if ".down." in key else "lora_up.weight"
        expected[f"{module}.{suffix}"] = value
    kohya, _ = lora_tensors(read_lora(os.path.join(LORAS, name)).modules, "sd1", "kohya")
    assert sorted(k for k in kohya if not k.endswith(".alpha")) == sorted(expected)
    assert all(float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))  # absent alpha = rank
    assert_same_deltas(probe_deltas(expected), probe_deltas(kohya))
    peft, meta = lora_tensors(lora_from_tensors(kohya).modules, "sd1", "diffusers")
    back, _ = lora_tensors(lora_from_tensors(peft, meta).modules, "sd1", "kohya")
    assert sorted(back) == sorted(kohya) and all(back[k].equal(v) for k, v in kohya.items())


def _lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW = (α/r)·kron(w1_a@w1_b, w2_a@w2_b), r = w2_b rows (both factors decomposed here), float64."""
    w1 = t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
    w2 = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
    return float(t["alpha"]) / t["lokr_w2_b"].shape[0] * torch.kron(w1, w2)


@needs_data
def test_lycoris_lokr_converts_losslessly():
    path = os.path.join(LORAS, "LyCORIS__smart_falcon_4_lokr.safetensors")
    tensors, _ = load_tensors(path)
    lora = read_lora(path)
    for fmt in ("comfy", "ai-toolkit"):  # both hold LyCORIS modules for SD1 (ai-toolkit: kohya-style names)
        out, meta = lora_tensors(lora.modules, "sd1", fmt)
        back, _ = lora_tensors(lora_from_tensors(out, meta).modules, "sd1", "kohya")
        assert sorted(back) == sorted(tensors)
        assert all(back[k].dtype == v.dtype and back[k].equal(v) for k, v in tensors.items()), fmt
    # And the adapter we build from a module gives the LoKr delta of the formula.
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    module = next(m for m in lora.modules if m.source == name)
    from networks import adapter_from_tensors

    got = adapter_from_tensors(module.tensors).delta(module.target.shape).double()
    want = _lokr_delta({s: tensors[f"{name}.{s}"] for s in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha")})
    assert torch.allclose(got, want.reshape(got.shape), rtol=1e-3, atol=1e-6)
    # diffusers/PEFT has no LoKr: every module becomes its exact LoRA (rank r1·r2), with the same delta.
    peft, meta = lora_tensors(lora.modules, "sd1", "diffusers")
    assert not any(".lokr_" in k for k in peft)
    module = next(m for m in lora_from_tensors(peft, meta).modules if m.target.key == module.target.key)
    lora_form = adapter_from_tensors(module.tensors)
    assert lora_form.kind == "lora" and lora_form.rank == tensors[f"{name}.lokr_w1_b"].shape[0] * \
        tensors[f"{name}.lokr_w2_b"].shape[0]
    assert torch.allclose(lora_form.delta(module.target.shape).double(), want.reshape(got.shape), rtol=1e-3, atol=1e-6)


@needs_data
def test_malformed_file_gets_a_clear_error():
    with pytest.raises(LoraToolsError) as info:
        read_lora(os.path.join(LORAS, MALFORMED))
    message = str(info.value)
    assert MALFORMED in message and "\n" not in message
    assert "lora_unet_unet_down_blocks_0" in message  # names what it saw


@needs_data
@pytest.mark.parametrize(("name", "family"), [("invokeai-stripped__Alien_Style.json", "sdxl"),
                                              ("invokeai-stripped__shinkai_makoto_offset.json", "sd1")])
def test_real_key_sets_detect_and_map_completely(name, family):
    with open(os.path.join(KEYMAPS, name)) as f:
        shapes = {k: tuple(v["shape"]) for k, v in json.load(f).items()}
    assert detect_lora(shapes, {}) == (family, "kohya")
    fm = detect(shapes, {})
    assert fm.unmatched == []
    assert sum(len(fm.modules[m]) for m in fm.matches) == len(shapes)
    # Convert the real key set (zero tensors that take no memory) to diffusers and back: same keys and shapes.
    zeros = {k: torch.zeros(()).expand(s) if s else torch.tensor(8.0) for k, s in shapes.items()}
    peft, meta = lora_tensors(lora_from_tensors(zeros).modules, family, "diffusers")
    back, _ = lora_tensors(lora_from_tensors(peft, meta).modules, family, "kohya")
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes
