"""The fast paths of TIES (knots' element-wise merge), DELLA and breadcrumbs (issue 15's bench) against
float64 references written here from the definitions, on float32 inputs with many equal values, with the
block sizes made small so that every block boundary, the per-task threshold rule for ties and the keep
draws continued block by block are exercised.

TIES: per task the int(density·n) largest |values| (among equal values the first in memory order), the sign of
the sum of the kept values (+1 on 0), the weighted mean of the kept values that share it. DELLA: per row the
rank r of |value| (ties in index order), p = density − ε + 2ε·r/(n − 1), kept iff u < p with u the float64
uniform stream of (seed, "<name>:della:<i>") in row-major order, kept values / p, TIES' election, × λ.
Breadcrumbs: drop the ⌊γn⌋ largest |values|, keep the next ⌊density·n⌋ (ties by index).
"""

from __future__ import annotations

import pytest
import torch

import library.merge_methods as merge_methods
import library.merge_methods_sparse as sparse
from library.lowrank import generator_for
from library.merge_methods import MergeContext, merge_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(merge_methods, "_ELECT_BLOCK", 64)
    monkeypatch.setattr(sparse, "_DELLA_BLOCK", 40)


def tied_tensors(shape, count, seed):
    """float32 tensors on a coarse grid (many equal |values|, zeros, both signs)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-6, 7, shape, generator=g) * 0.25).float() for _ in range(count)]


def memory_order_top(values: list[float], k: int) -> list[bool]:
    order = sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))
    keep = [False] * len(values)
    for j in order[:k]:
        keep[j] = True
    return keep


def ties_reference(ts, weights, density, sign_method):
    kept = []
    for t in ts:
        flat = t.double().reshape(-1)
        mask = torch.tensor(memory_order_top(flat.tolist(), int(density * flat.numel())))
        kept.append(torch.where(mask, flat, torch.zeros_like(flat)))
    stacked = torch.stack(kept)
    summed = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    sign = torch.where(summed >= 0, 1.0, -1.0).double()
    agree = stacked.sign() == sign
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1)
    return ((stacked * w * agree).sum(0) / agree.sum(0).clamp_min(1)).reshape(ts[0].shape)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_ties_blocks_and_ties_at_the_threshold(small_blocks, sign_method, density):
    ts = tied_tensors((13, 17), 4, seed=int(density * 10))
    weights = [1.0, 0.6, -0.4, 1.3]
    got = merge_tensors("ties", ts, weights, MergeContext(density=density, sign_method=sign_method))
    want = ties_reference(ts, weights, density, sign_method)
    assert float((got.double() - want).abs().max()) < 1e-6
    # continuous values: the threshold path without ties, and all-ones weights (no scaling pass)
    g = torch.Generator().manual_seed(3)
    cs = [torch.randn(7, 40, generator=g) for _ in range(3)]
    got = merge_tensors("ties", cs, [1.0] * 3, MergeContext(density=density, sign_method=sign_method))
    assert float((got.double() - ties_reference(cs, [1.0] * 3, density, sign_method)).abs().max()) < 1e-6


def della_reference(ts, weights, density, eps, lam, seed, name):
    kept = []
    for i, t in enumerate(ts):
        rows = t.double().reshape(t.shape[0], -1)
        n = rows.shape[1]
        ranks = torch.zeros_like(rows)
        for r, row in enumerate(rows.tolist()):
            for position, j in enumerate(sorted(range(n), key=lambda j: (abs(row[j]), j))):
                ranks[r, j] = position
        p = density - eps + 2 * eps * ranks / (n - 1)
        u = torch.rand(tuple(t.shape), generator=generator_for(seed, f"{name}:della:{i}"), dtype=torch.float64)
        keep = u.reshape(rows.shape) < p
        kept.append(torch.where(keep, rows / p, torch.zeros_like(rows)))
    stacked = torch.stack(kept)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    agree = stacked.sign() == sign
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)
    return (lam * (stacked * w * agree).sum(0) / agree.sum(0).clamp_min(1)).reshape(ts[0].shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_della_row_ranks_and_draws_by_blocks(small_blocks, dtype):
    ts = [t.to(dtype) for t in tied_tensors((11, 9), 3, seed=5)]
    weights = [1.0, -0.7, 0.5]
    ctx = MergeContext(density=0.5, epsilon=0.2, lambda_=1.3, seed=4, name="layer")
    got = merge_tensors("della", ts, weights, ctx)
    want = della_reference(ts, weights, 0.5, 0.2, 1.3, 4, "layer")
    tol = 1e-2 if dtype == torch.float16 else 1e-6  # float16 rounds t / p and the sums
    assert float((got.double() - want).abs().max() / want.abs().max()) < tol
    # a conv kernel [out, in, kh, kw]: rows are the flattened kernels
    conv = tied_tensors((6, 2, 3, 3), 2, seed=6)
    got = merge_tensors("della", conv, [1.0, 1.0], MergeContext(density=0.6, epsilon=0.1, seed=1, name="c"))
    want = della_reference(conv, [1.0, 1.0], 0.6, 0.1, 1.0, 1, "c")
    assert float((got.double() - want).abs().max()) < 1e-6


def test_breadcrumbs_with_ties_on_both_cuts():
    ts = tied_tensors((23, 19), 3, seed=8)
    weights = [0.8, 1.1, -0.5]
    got = merge_tensors("breadcrumbs", ts, weights, MergeContext(density=0.6, gamma=0.1))
    want = 0
    for t, w in zip(ts, weights):
        flat = t.double().reshape(-1).tolist()
        top, keep = int(0.1 * len(flat)), int(0.6 * len(flat))
        order = sorted(range(len(flat)), key=lambda j: (-abs(flat[j]), j))
        mask = torch.zeros(len(flat), dtype=torch.float64)
        mask[order[top:top + keep]] = 1.0
        want = want + w * t.double() * mask.reshape(t.shape)
    assert float((got.double() - want).abs().max()) < 1e-6
