"""library/merge_methods.py against formulas written out here and against peft.utils.merge_utils."""

import pytest
import torch

from library.errors import LoraToolsError
from library.merge_methods import (
    METHOD_NAMES,
    MergeContext,
    dare_mask,
    factor_weights,
    get_method,
    merge_factors,
    merge_tensors,
)


def tensors(n=3, shape=(12, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def top_k_by_hand(t, density):
    """Zero all but the int(density·numel) largest |t| (ties impossible with random data)."""
    k = int(density * t.numel())
    flat = t.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))
    out = torch.zeros_like(flat)
    for i in order[:k]:
        out[i] = flat[i]
    return out.reshape(t.shape)


def elected_mean_by_hand(pruned, weights, method):
    """Per element: elected sign, then the mean of the weighted entries whose sign equals it."""
    out = torch.zeros_like(pruned[0])
    for idx in range(out.numel()):
        vals = [float(p.reshape(-1)[idx]) for p in pruned]
        votes = sum(vals) if method == "total" else sum((v > 0) - (v < 0) for v in vals)
        sign = 1 if votes >= 0 else -1
        agree = [w * v for v, w in zip(vals, weights) if (v > 0) - (v < 0) == sign]
        out.reshape(-1)[idx] = sum(agree) / max(len(agree), 1)
    return out


W = [0.7, -0.4, 1.2]


def test_add_and_magnitude_prune_formulas():
    ts = tensors()
    assert torch.allclose(merge_tensors("add", ts, W), sum(w * t for w, t in zip(W, ts)))
    expect = sum(w * top_k_by_hand(t, 0.3) for w, t in zip(W, ts))
    assert torch.allclose(merge_tensors("magnitude_prune", ts, W, MergeContext(density=0.3)), expect)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_formula(sign_method):
    ts = tensors(seed=1)
    pruned = [top_k_by_hand(t, 0.5) for t in ts]
    expect = elected_mean_by_hand(pruned, W, sign_method)
    got = merge_tensors("ties", ts, W, MergeContext(density=0.5, sign_method=sign_method))
    assert torch.allclose(got, expect)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_dare_formulas_rescale_by_one_over_density(sign_method):
    ts = tensors(seed=2)
    ctx = MergeContext(density=0.25, seed=11, name="model.diffusion_model.out.2.weight", sign_method=sign_method)
    got = merge_tensors("dare_linear", ts, W, ctx)
    masks = [dare_mask(t.shape, 0.25, 11, f"{ctx.name}:{i}") for i, t in enumerate(ts)]
    kept = [t * m / 0.25 for t, m in zip(ts, masks)]
    assert torch.allclose(got, sum(w * k for w, k in zip(W, kept)))
    assert abs(float(torch.stack(masks).double().mean()) - 0.25) < 0.08  # keep probability is the density
    got_ties = merge_tensors("dare_ties", ts, W, ctx)
    assert torch.allclose(got_ties, elected_mean_by_hand(kept, W, sign_method))


def test_dare_mask_depends_only_on_seed_name_and_index():
    ts = tensors(seed=3)
    ctx = MergeContext(density=0.5, seed=5, name="a.weight")
    two = merge_tensors("dare_linear", ts[:2], W[:2], ctx)
    three_with_zero_weight = merge_tensors("dare_linear", ts, [W[0], W[1], 0.0], ctx)
    assert torch.equal(two, three_with_zero_weight)  # adding a file does not move the others' masks
    assert torch.equal(two, merge_tensors("dare_linear", ts[:2], W[:2], ctx))  # reproducible
    other = merge_tensors("dare_linear", ts[:2], W[:2], MergeContext(density=0.5, seed=5, name="b.weight"))
    assert not torch.equal(two, other)
    reseeded = merge_tensors("dare_linear", ts[:2], W[:2], MergeContext(density=0.5, seed=6, name="a.weight"))
    assert not torch.equal(two, reseeded)


def test_density_edges_and_errors():
    ts = tensors(seed=4)
    full = merge_tensors("add", ts, W)
    for method in METHOD_NAMES:
        if method not in ("ties", "dare_ties", "della", "tsv", "iso_c", "iso_cts", "knots", "np_lora"):  # not plain sums
            assert torch.allclose(merge_tensors(method, ts, W, MergeContext(density=1.0)), full)
    assert torch.count_nonzero(merge_tensors("magnitude_prune", ts, W, MergeContext(density=0.0))) == 0
    with pytest.raises(LoraToolsError):
        merge_tensors("dare_linear", ts, W, MergeContext(density=0.0))
    with pytest.raises(LoraToolsError):
        merge_tensors("ties", ts, W, MergeContext(density=1.5))
    with pytest.raises(LoraToolsError):
        merge_tensors("ties", ts, W, MergeContext(sign_method="median"))
    with pytest.raises(LoraToolsError):
        merge_tensors("add", ts, W[:2])
    with pytest.raises(LoraToolsError):
        merge_tensors("nope", ts, W)


def test_registry_aliases_and_params():
    assert get_method("ties_svd") is get_method("ties")
    assert get_method("add_svd").name == "add" and get_method("dare_linear_svd").name == "dare_linear"
    assert get_method("dare_ties").params == ("density", "sign_method", "seed") and get_method("dare_ties").random
    assert get_method("magnitude_prune").params == ("density",) and not get_method("ties").random


def test_against_peft_merge_utils():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    ts = [t.float() for t in tensors(seed=6)]
    w = torch.tensor(W)
    assert torch.allclose(merge_tensors("add", ts, W), merge_utils.task_arithmetic(ts, w), atol=1e-6)
    ctx = MergeContext(density=0.4)
    assert torch.allclose(merge_tensors("magnitude_prune", ts, W, ctx), merge_utils.magnitude_prune(ts, w, 0.4), atol=1e-6)
    for sign in ("total", "frequency"):
        ctx = MergeContext(density=0.4, sign_method=sign)
        assert torch.allclose(merge_tensors("ties", ts, W, ctx), merge_utils.ties(ts, w, 0.4, sign), atol=1e-6)
    # DARE: PEFT draws torch.bernoulli from the global RNG; replay its masks explicitly.
    for name, fn in (("dare_linear", lambda: merge_utils.dare_linear(ts, w, 0.3)),
                     ("dare_ties", lambda: merge_utils.dare_ties(ts, w, 0.3, "total"))):
        torch.manual_seed(1234)
        peft_result = fn()
        torch.manual_seed(1234)
        masks = [torch.bernoulli(torch.full_like(t, 0.3)).bool() for t in ts]
        ours = merge_tensors(name, ts, W, MergeContext(density=0.3, masks=masks))
        assert torch.allclose(ours, peft_result, atol=1e-5)


def test_factor_space_merge_applies_the_method_per_factor():
    g = torch.Generator().manual_seed(7)
    ups = [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    downs = [torch.randn(4, 12, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [0.8, -0.5]
    up_w, down_w = factor_weights(weights)
    assert up_w[1] * down_w[1] == pytest.approx(-0.5)
    up, down = merge_factors("add", ups, downs, weights)
    assert torch.allclose(up, sum(a * u for a, u in zip(up_w, ups)))
    assert torch.allclose(down, sum(b * d for b, d in zip(down_w, downs)))
    # One LoRA alone keeps its strength exactly, negative included.
    up1, down1 = merge_factors("add", ups[:1], downs[:1], [-0.5])
    assert torch.allclose(up1 @ down1, -0.5 * ups[0] @ downs[0])
    # ties: each side pruned and elected on its own.
    up, down = merge_factors("ties", ups, downs, weights, MergeContext(density=0.5))
    assert torch.allclose(up, elected_mean_by_hand([top_k_by_hand(u, 0.5) for u in ups], up_w, "total"))
    assert torch.allclose(down, elected_mean_by_hand([top_k_by_hand(d, 0.5) for d in downs], down_w, "total"))
    # DARE: up and down get independent masks named after the factor.
    ctx = MergeContext(density=0.5, seed=3, name="lora_unet_x")
    up, down = merge_factors("dare_linear", ups, downs, weights, ctx)
    masks = [dare_mask(u.shape, 0.5, 3, f"lora_unet_x.lora_up:{i}") for i, u in enumerate(ups)]
    assert torch.allclose(up, sum(a * u * m / 0.5 for a, u, m in zip(up_w, ups, masks)))
    with pytest.raises(LoraToolsError):
        merge_factors("add", [ups[0], ups[1][:, :2]], [downs[0], downs[1][:2]], weights)
