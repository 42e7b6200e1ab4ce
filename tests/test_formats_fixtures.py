"""The LoRA fixtures of tests/helpers.py (real module names and shapes, built from `reference/shapes/`
without our tables) and their independent delta reading, pinned to the module counts that formats.md
states, so a fixture bug cannot hide a converter bug.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import kohya_modules, needs_shapes, probe_deltas


@needs_shapes
@pytest.mark.parametrize(("family", "count"), [("sd1", 278 + 72), ("sd2", 278 + 138), ("sdxl", 788 + 72 + 192),
                                               ("flux1", 314 + 72 + 168)])
def test_fixture_module_counts_match_the_reference(family, count):
    # formats.md §4.2/§4.3/§3.2: full LoCon UNets (SD1/2: 278, SDXL: 788), Flux 314 BFL Linears; TEs 72/138/192/168.
    assert len(kohya_modules(family)) == count


@needs_shapes
def test_probe_deltas_match_a_dense_product():
    t = {"m.lora_down.weight": torch.randn(2, 5, 3, 3), "m.lora_up.weight": torch.randn(4, 2, 1, 1),
         "m.alpha": torch.tensor(1.0)}
    x_seed = probe_deltas(t)["m"]
    dense = 0.5 * (t["m.lora_up.weight"].double().flatten(1) @ t["m.lora_down.weight"].double().flatten(1))
    gen = torch.Generator().manual_seed(7 + 45)
    x = torch.randn(45, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(x_seed, dense @ x)
