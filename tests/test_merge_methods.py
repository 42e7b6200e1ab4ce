"""Merge methods against the formulas written out here and against peft.utils.merge_utils."""

import pytest
import torch

from library.merge_methods import (
    MergeContext,
    dare_mask,
    generator_for,
    magnitude_mask,
    merge_tensors,
    resolve_method,
)

torch.manual_seed(0)
TENSORS = [torch.randn(12, 10, dtype=torch.float64) for _ in range(3)]
WEIGHTS = [0.7, -0.4, 1.2]


def test_add_is_weighted_sum():
    out = merge_tensors("add", TENSORS, WEIGHTS, MergeContext())
    assert torch.allclose(out, sum(w * t for w, t in zip(WEIGHTS, TENSORS)))


def test_magnitude_prune_formula():
    out = merge_tensors("magnitude_prune", TENSORS, WEIGHTS, MergeContext(density=0.3))
    expected = torch.zeros_like(TENSORS[0])
    for w, t in zip(WEIGHTS, TENSORS):
        k = int(0.3 * t.numel())
        threshold = t.abs().reshape(-1).sort(descending=True).values[k - 1]
        expected += w * torch.where(t.abs() >= threshold, t, 0.0)
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_formula(sign_method):
    out = merge_tensors("ties", TENSORS, WEIGHTS, MergeContext(density=0.5, sign_method=sign_method))
    pruned = torch.stack([t * magnitude_mask(t, 0.5) for t in TENSORS])
    summed = pruned.sum(0) if sign_method == "total" else pruned.sign().sum(0)
    elected = torch.where(summed >= 0, 1.0, -1.0).double()
    expected = torch.zeros_like(TENSORS[0])
    for i in range(12):
        for j in range(10):
            agree = [WEIGHTS[n] * pruned[n, i, j] for n in range(3) if torch.sign(pruned[n, i, j]) == elected[i, j]]
            expected[i, j] = sum(agree) / max(len(agree), 1)
    assert torch.allclose(out, expected)


def test_dare_rescales_and_is_seeded_per_target():
    ctx = MergeContext(density=0.25, seed=7, name="model.diffusion_model.x.weight")
    out = merge_tensors("dare_linear", TENSORS, WEIGHTS, ctx)
    gen = generator_for(7, "model.diffusion_model.x.weight")
    masks = [dare_mask(t.shape, 0.25, gen) for t in TENSORS]
    expected = sum(w * t * m / 0.25 for w, t, m in zip(WEIGHTS, TENSORS, masks))
    assert torch.allclose(out, expected)
    assert torch.equal(out, merge_tensors("dare_linear", TENSORS, WEIGHTS, ctx))
    other = merge_tensors("dare_linear", TENSORS, WEIGHTS, MergeContext(density=0.25, seed=7, name="other"))
    assert not torch.equal(out, other)
    # rescale keeps the expectation: over many draws the mean approaches the plain sum
    big = [torch.ones(200, 200, dtype=torch.float64)]
    mean = merge_tensors("dare_linear", big, [1.0], MergeContext(density=0.2, seed=1, name="b")).mean()
    assert abs(float(mean) - 1.0) < 0.05


def test_aliases_and_errors():
    assert resolve_method("ties_svd") == "ties" and resolve_method("add_svd") == "add"
    with pytest.raises(ValueError):
        resolve_method("slerp")
    with pytest.raises(ValueError):
        merge_tensors("ties", TENSORS, WEIGHTS, MergeContext(density=1.5))


merge_utils = pytest.importorskip("peft.utils.merge_utils")


def test_against_peft_magnitude_ties_and_linear():
    ours = merge_tensors("ties", TENSORS, WEIGHTS, MergeContext(density=0.4))
    theirs = merge_utils.ties(TENSORS, torch.tensor(WEIGHTS, dtype=torch.float64), 0.4, "total")
    assert torch.allclose(ours, theirs)
    ours = merge_tensors("magnitude_prune", TENSORS, WEIGHTS, MergeContext(density=0.4))
    theirs = merge_utils.magnitude_prune(TENSORS, torch.tensor(WEIGHTS, dtype=torch.float64), 0.4)
    assert torch.allclose(ours, theirs)
    ours = merge_tensors("add", TENSORS, WEIGHTS, MergeContext())
    assert torch.allclose(ours, merge_utils.task_arithmetic(TENSORS, torch.tensor(WEIGHTS, dtype=torch.float64)))


@pytest.mark.parametrize("mode", ["dare_linear", "dare_ties"])
def test_against_peft_dare_with_explicit_mask(monkeypatch, mode):
    """PEFT draws its mask with torch.bernoulli; hand it our masks so both compute on the same draw."""
    ctx = MergeContext(density=0.3, seed=3, name="k")
    gen = generator_for(3, "k")
    masks = iter([dare_mask(t.shape, 0.3, gen).double() for t in TENSORS])
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda probs: next(masks))
    theirs = getattr(merge_utils, mode)(TENSORS, torch.tensor(WEIGHTS, dtype=torch.float64), 0.3)
    monkeypatch.undo()
    assert torch.allclose(merge_tensors(mode, TENSORS, WEIGHTS, ctx), theirs)
