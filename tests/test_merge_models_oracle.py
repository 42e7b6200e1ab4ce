"""sd-mecha (ljleb/sd-mecha, test-only, pinned in requirements-dev.txt) as an outside oracle for
merge_models.py's weighted_sum, add_difference and ties on the same small SD1.x checkpoints.

sd-mecha's conventions: weighted_sum(a, b, alpha) = (1 − alpha)·a + alpha·b, our ratios (1 − alpha, alpha);
add_difference(a, b, c, alpha) = a + alpha·(b − c), our ratios (1, alpha) with --base c; ties_sum(k, vote_sgn)
keeps |δ| ≥ the kthvalue at position max(int((1 − k)·n), 1), one more entry than int(k·n) (ours and PEFT's),
so the comparison uses k = 1 (all kept; the sign election and disjoint mean are what is compared) and
vote_sgn=True (= our `total`); a ratio common to every model is sd-mecha's alpha on the TIES result.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_models
from tests.helpers import run_script

sd_mecha = pytest.importorskip("sd_mecha")

KEYS = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
        "model.diffusion_model.input_blocks.1.1.norm.bias": (8,),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": (8, 8, 1, 1),
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (19, 19)}


class _Quiet:
    """A tqdm stand-in: sd-mecha's progress bar would flood the test output."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


@pytest.fixture
def files(tmp_path):
    out = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        # float32 values stored as float64: sd-mecha's top-k threshold is taken in float32 (kthvalue of
        # `.float()`), which for other float64 values can round the smallest magnitude up and drop it.
        tensors = {k: (torch.randn(s, generator=g) * 0.1).double() for k, s in KEYS.items()}
        path = tmp_path / f"m{i}.safetensors"
        save_file(tensors, str(path))
        out.append((path, tensors))
    return out


def mecha(recipe) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    sd_mecha.merge(recipe, output=out, strict_mandatory_keys=False, check_extra_keys=False, merge_dtype=torch.float64,
                   output_dtype=torch.float64, threads=0, tqdm=_Quiet)
    return out


def node(tensors):
    return sd_mecha.model(dict(tensors), config="sd1-ldm")


def ours(tmp_path, paths, *flags) -> dict[str, torch.Tensor]:
    out = tmp_path / "ours.safetensors"
    run_script(merge_models, ["--models", *paths, "--save_to", out, "--family", "sd1", "--precision", "fp64",
                              "--overwrite", *flags])
    return load_file(str(out))


def assert_equal_to_mecha(a, b):
    assert set(KEYS) <= set(a) and set(KEYS) <= set(b)
    for key in KEYS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=key)


def test_weighted_sum(tmp_path, files):
    (pa, ta), (pb, tb) = files[:2]
    assert_equal_to_mecha(ours(tmp_path, [pa, pb], "--ratios", "0.7", "0.3"),
                          mecha(sd_mecha.weighted_sum(node(ta), node(tb), alpha=0.3)))


def test_add_difference(tmp_path, files):
    (pa, ta), (pb, tb), (pc, tc) = files[:3]
    assert_equal_to_mecha(ours(tmp_path, [pa, pb], "--method", "add_difference", "--base", pc, "--ratios", "1", "0.6"),
                          mecha(sd_mecha.add_difference(node(ta), node(tb), node(tc), alpha=0.6)))


def test_ties(tmp_path, files):
    from sd_mecha.extensions.builtin.merge_methods import linear

    (pa, ta), (pb, tb), (pc, tc), (pbase, tbase) = files
    deltas = [sd_mecha.subtract(node(t), node(tbase)) for t in (ta, tb, tc)]
    # sd_mecha.add_difference_ties(...) fails in 1.1.8 (a merge space of None compared in its wrapper): build it
    # from its parts, base + alpha·ties_sum(deltas).
    recipe = linear.add_difference(node(tbase), sd_mecha.ties_sum(*deltas, k=1.0, vote_sgn=True), alpha=0.8)
    assert_equal_to_mecha(ours(tmp_path, [pa, pb, pc], "--method", "ties", "--base", pbase, "--ratios", "0.8", "0.8",
                               "0.8", "--majority_sign_method", "total"), mecha(recipe))
