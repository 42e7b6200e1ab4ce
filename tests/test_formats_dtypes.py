"""Half-precision files: conversions that keep alpha are bit exact; baking a power-of-two scale is exact too."""

from __future__ import annotations

import pytest
import torch

from library.formats import lora_from_tensors, lora_tensors
from library.formats.write import bake_factors

NAME = "lora_unet_double_blocks_2_img_attn_proj"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["diffusers", "comfy", "ai-toolkit"])
def test_half_precision_round_trip_is_bit_exact(dtype, fmt):
    down, up = torch.randn(4, 3072).to(dtype), torch.randn(3072, 4).to(dtype)
    t = {f"{NAME}.lora_down.weight": down, f"{NAME}.lora_up.weight": up, f"{NAME}.alpha": torch.tensor(1.0, dtype=dtype)}
    out, meta = lora_tensors(lora_from_tensors(t).modules, "flux1", fmt)
    assert all(v.dtype == dtype for k, v in out.items() if not k.endswith("alpha"))
    back, _ = lora_tensors(lora_from_tensors(out, meta).modules, "flux1", "kohya")
    if fmt == "ai-toolkit":
        # scale 1/4 baked as 1/2 on each factor (powers of two: exact), then read back at scale 1 (alpha = rank)
        assert back[f"{NAME}.lora_down.weight"].equal(down * 0.5) and back[f"{NAME}.lora_up.weight"].equal(up * 0.5)
        assert float(back[f"{NAME}.alpha"]) == 4.0
    else:
        assert all(back[k].dtype == v.dtype and back[k].equal(v) for k, v in t.items())


@pytest.mark.parametrize(("scale", "expected"), [(1.0, (1.0, 1.0)), (2.0, (2.0, 1.0)), (0.5, (0.5, 1.0)),
                                                 (0.25, (0.5, 0.5)), (1 / 16, (0.25, 0.25)), (0.3, (0.6, 0.5))])
def test_bake_factors_follow_the_power_of_two_rule(scale, expected):
    # formats.md §1.1: start with all on down; while 2·down < up, double down and halve up.
    down, up = bake_factors(scale)
    assert (down, up) == pytest.approx(expected) and down * up == pytest.approx(scale)
