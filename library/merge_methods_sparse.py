"""DELLA and Model Breadcrumbs: element-wise sparsifying merges (registered in library.methods).

della        (Deep et al., 2024, "DELLA-Merging"): MAGPRUNE, then TIES' sign election and disjoint mean, × λ.
             MAGPRUNE ranks the entries of each row by magnitude, r = 0 (smallest) … n−1 (largest), and keeps
             entry (i, j) with probability pᵢⱼ = density − ε + 2ε·rᵢⱼ/(n − 1) (linear over
             [density − ε, density + ε]; a one-entry row gets density), rescaling kept entries by 1/pᵢⱼ so the
             expectation is unchanged. Masks are drawn on the CPU from (seed, target, input position).
             density 1 drops nothing (then della is TIES' election and disjoint mean, × λ).
breadcrumbs  (Davari & Belilovsky, ECCV 2024, "Model Breadcrumbs"; mergekit's `breadcrumbs`): per tensor, sort
             |t| in decreasing order, drop the first ⌊γ·n⌋ (outliers) and keep the next ⌊density·n⌋ (the
             smallest rest is dropped too), then Σ wᵢ·tᵢ of the masked tensors. density 1 drops nothing (as
             mergekit), so breadcrumbs needs --density ≤ 1 − γ to do anything.

Both work on whatever tensors they are given: full deltas of one layer (svd_merge_lora's delta space) or
ups and downs separately (merge_lora's factor space, library.merge_methods.merge_factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from library.errors import LoraToolsError


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as rows: [out, rest] for a weight (conv kernels flattened), one row for a vector."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


# Entries per block of rows of MAGPRUNE: its keys, probabilities and draws stay in cache (1 MiB of int64).
_DELLA_BLOCK = 1 << 17


def _row_order(rows: torch.Tensor) -> torch.Tensor:
    """Column indices of each row by increasing |value|, ties in index order (a stable argsort), [b, n] int64.

    On the CPU float32 rows (half types widen exactly) sort as unique int64 keys |x|-bits·2³² + column: the bits
    of a non-negative float order as its value, so numpy's SIMD sort of the keys (unstable, but no two keys are
    equal) gives the stable order, 5× faster than torch's stable argsort. float64 rows use numpy's stable argsort.
    """
    if rows.device.type != "cpu":
        return rows.abs().argsort(dim=1, stable=True)
    import numpy as np

    if rows.dtype == torch.float64:
        return torch.from_numpy(np.argsort(np.abs(rows.numpy()), axis=1, kind="stable"))
    n = rows.shape[1]
    keys = rows.float().abs().view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    keys.bitwise_or_(torch.arange(n, dtype=torch.int64))
    ordered = np.sort(keys.numpy(), axis=1)
    return torch.from_numpy(ordered).bitwise_and_(0xFFFFFFFF)


def _row_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities of a block of rows [b, n] (float64; see magprune_probabilities)."""
    n = rows.shape[1]
    if n == 1:
        return torch.full(rows.shape, density, dtype=torch.float64, device=rows.device)
    # p of the entry of rank r, the formula's own float64 operations, then placed at each entry's column
    by_rank = (density - epsilon) + (2.0 * epsilon) * torch.arange(n, dtype=torch.float64, device=rows.device) / (n - 1)
    order = _row_order(rows).to(rows.device)
    return torch.empty(rows.shape, dtype=torch.float64, device=rows.device).scatter_(1, order, by_rank.expand(rows.shape))


def magprune_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of every entry (shaped like t), from its magnitude rank within its row:
    r = 0 (smallest |value|) … n − 1, ties in index order, p = density − ε + 2ε·r/(n − 1)."""
    if density >= 1:
        return torch.ones_like(t, dtype=torch.float64)  # density 1 keeps everything (mergekit's rule too)
    return _row_probabilities(_rows(t), density, epsilon).reshape(t.shape)


def della_mask(p: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Keep-mask with P(keep) = p, drawn on the CPU from (seed, name) so every device and order agrees."""
    from library.lowrank import generator_for

    return torch.rand(tuple(p.shape), generator=generator_for(seed, name), dtype=torch.float64) < p.cpu()


def _magprune_into(out: torch.Tensor, t: torch.Tensor, ctx, i: int) -> None:
    """MAGPRUNE of t into out (same shape), a block of rows at a time: keep probabilities from the row ranks,
    the keep draws u < p (u from della_mask's stream, which a block of rows continues exactly), kept / p."""
    from library.lowrank import generator_for

    rows, dest = _rows(t), _rows(out)
    if ctx.density >= 1:
        dest.copy_(rows)  # every p is 1: all kept, unscaled (and no draw changes that)
        return
    masks = _rows(ctx.masks[i]) if ctx.masks is not None else None
    gen = generator_for(ctx.seed, f"{ctx.name}:della:{i}") if masks is None else None
    step = max(1, _DELLA_BLOCK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        p = _row_probabilities(block, ctx.density, ctx.epsilon)
        if masks is None:
            keep = torch.rand(tuple(block.shape), generator=gen, dtype=torch.float64) < p.cpu()
        else:
            keep = masks[start:start + step]
        kept = torch.div(block, p.to(t.dtype), out=dest[start:start + step])
        kept.mul_(keep.to(t.device, torch.bool))


def magprune(tensors: Sequence[torch.Tensor], ctx) -> list[torch.Tensor]:
    """MAGPRUNE of each tensor: kept entries rescaled by 1/p (ctx.masks, when given, replace the draws)."""
    return list(_magprune_stack(tensors, ctx))


def _magprune_stack(tensors: Sequence[torch.Tensor], ctx) -> torch.Tensor:
    kept = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        _magprune_into(kept[i], t, ctx, i)
    return kept


def merge_della(tensors, weights, ctx) -> torch.Tensor:
    from library.merge_methods import elected_mean

    # the sign is elected on the unweighted pruned tensors, as our ties
    return elected_mean(_magprune_stack(tensors, ctx), weights, ctx.sign_method).mul_(ctx.lambda_)


def breadcrumbs_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep-mask of the entries ranked ⌊γ·n⌋ … ⌊γ·n⌋ + ⌊density·n⌋ − 1 by decreasing |value| (ties by index):
    the top ⌊γ·n⌋ + ⌊density·n⌋ less the top ⌊γ·n⌋ (two exact selections, merge_methods.top_k_mask: both
    take the first in memory order among equal values, so they are prefixes of that one order)."""
    from library.merge_methods import top_k_mask

    n = t.numel()
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)  # density 1 keeps everything (mergekit's rule too)
    top, keep = int(gamma * n), int(density * n)
    flat = t.abs().reshape(-1)
    mask = top_k_mask(flat, top + keep)
    if top:
        mask &= ~top_k_mask(flat, top)
    return mask.reshape(t.shape)


def merge_breadcrumbs(tensors, weights, ctx) -> torch.Tensor:
    total = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        total.add_((t * breadcrumbs_mask(t, ctx.density, ctx.gamma)).mul_(float(w)))
    return total


def check_sparse_params(name: str, ctx) -> None:
    """Refuse DELLA / breadcrumbs parameters that cannot work, naming the flags (density 1 drops nothing)."""
    drops = ctx.density < 1
    if name == "della":
        if drops and not (ctx.epsilon >= 0 and ctx.density - ctx.epsilon > 0 and ctx.density + ctx.epsilon <= 1):
            raise LoraToolsError(f"della keeps entries with probabilities in [density − epsilon, density + epsilon], "
                                 f"which must lie in (0, 1]: --density {ctx.density:g} --epsilon {ctx.epsilon:g} "
                                 "(e.g. --density 0.5 --epsilon 0.1)")
        if not 0 < ctx.lambda_ < float("inf"):
            raise LoraToolsError(f"--lambda must be a positive number, got {ctx.lambda_:g}")
    if name == "breadcrumbs" and drops and not (0 <= ctx.gamma < 1 and ctx.gamma + ctx.density <= 1):
        raise LoraToolsError(f"breadcrumbs drops the top --gamma share and keeps the next --density share: "
                             f"gamma + density must be at most 1, got --gamma {ctx.gamma:g} --density {ctx.density:g} "
                             "(e.g. --density 0.9 --gamma 0.01)")
