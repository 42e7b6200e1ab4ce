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


def magprune_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of every entry (shaped like t), from its magnitude rank within its row."""
    rows = _rows(t)
    n = rows.shape[1]
    if density >= 1:
        return torch.ones_like(t, dtype=torch.float64)  # density 1 keeps everything (mergekit's rule too)
    if n == 1:
        return torch.full_like(t, density, dtype=torch.float64)
    # rank of each entry in its row, 0 = smallest |value|; ties in index order (stable sort)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=t.device).expand_as(order))
    p = (density - epsilon) + (2.0 * epsilon) * ranks.double() / (n - 1)
    return p.reshape(t.shape)


def della_mask(p: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Keep-mask with P(keep) = p, drawn on the CPU from (seed, name) so every device and order agrees."""
    from library.lowrank import generator_for

    return torch.rand(tuple(p.shape), generator=generator_for(seed, name), dtype=torch.float64) < p.cpu()


def magprune(tensors: Sequence[torch.Tensor], ctx) -> list[torch.Tensor]:
    """MAGPRUNE of each tensor: kept entries rescaled by 1/p (ctx.masks, when given, replace the draws)."""
    out = []
    for i, t in enumerate(tensors):
        p = magprune_probabilities(t, ctx.density, ctx.epsilon)
        mask = ctx.masks[i] if ctx.masks is not None else della_mask(p, ctx.seed, f"{ctx.name}:della:{i}")
        mask = mask.to(t.device, torch.bool)
        out.append(torch.where(mask, t / p.to(t.device, t.dtype), torch.zeros_like(t)))
    return out


def merge_della(tensors, weights, ctx) -> torch.Tensor:
    from library.merge_methods import _weighted, disjoint_mean, majority_sign

    kept = torch.stack(magprune(tensors, ctx))
    sign = majority_sign(kept, ctx.sign_method)  # elected on the unweighted pruned tensors, as our ties
    return ctx.lambda_ * disjoint_mean(_weighted(list(kept), weights), kept.sign() == sign)


def breadcrumbs_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep-mask of the entries ranked ⌊γ·n⌋ … ⌊γ·n⌋ + ⌊density·n⌋ − 1 by decreasing |value| (ties by index)."""
    n = t.numel()
    if density >= 1:
        return torch.ones_like(t, dtype=torch.bool)  # density 1 keeps everything (mergekit's rule too)
    top, keep = int(gamma * n), int(density * n)
    order = t.abs().reshape(-1).argsort(descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[order[top:top + keep]] = True
    return mask.reshape(t.shape)


def merge_breadcrumbs(tensors, weights, ctx) -> torch.Tensor:
    from library.merge_methods import _weighted

    masked = [t * breadcrumbs_mask(t, ctx.density, ctx.gamma) for t in tensors]
    return _weighted(masked, weights).sum(dim=0)


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
