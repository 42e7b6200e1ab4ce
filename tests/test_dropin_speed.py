"""Speed fixes of issue 18 keep the exact results: the magnitude selection of TIES / magnitude_prune (it was a
topk over millions of values) and the factored resize (a dynamic rank rule needs the whole spectrum, the
factors only the kept columns)."""

import torch

from library.merge_methods import kth_largest, magnitude_mask


def _topk_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude_based_pruning, written out: the k = int(density·numel) largest |values|."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool)
    if k:
        mask[tensor.abs().reshape(-1).topk(k).indices] = True
    return mask.reshape(tensor.shape)


def test_magnitude_mask_is_topk_on_a_low_rank_delta_large_enough_for_the_bracket():
    g = torch.Generator().manual_seed(0)
    # 700 × 600 = 420k values: over the size where a sample brackets the threshold; a rank-8 product has the
    # row/column structure that fooled a strided sample.
    delta = (torch.randn(700, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 600, generator=g,
                                                                                   dtype=torch.float64)).float()
    for density in (0.01, 0.3, 0.5, 0.9, 0.999):
        ours, ref = magnitude_mask(delta, density), _topk_mask(delta, density)
        assert int(ours.sum()) == int(ref.sum())
        # same set up to values equal to the threshold, where topk's choice is arbitrary
        threshold = delta.abs()[ref].min()
        assert bool((ours == ref)[delta.abs() != threshold].all())


def test_magnitude_mask_keeps_exactly_k_among_ties():
    t = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 2.0] * 50000)  # 400k values, huge ties
    for density in (0.1, 0.2, 0.3, 0.55):
        mask = magnitude_mask(t, density)
        k = int(density * t.numel())
        assert int(mask.sum()) == k
        kept, dropped = t[mask], t[~mask]
        assert float(kept.min()) >= float(dropped.max())  # never a smaller value kept over a larger one


def test_kth_largest_matches_sort():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(300_001, generator=g).abs()
    ordered = values.sort(descending=True).values
    for k in (1, 2, 1000, 150_000, 299_999, 300_001):
        assert float(kth_largest(values, k)) == float(ordered[k - 1])
