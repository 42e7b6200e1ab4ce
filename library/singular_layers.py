"""svd_merge's layers for the singular-space methods (tsv, iso_c, iso_cts, knots, np_lora): a `LayerJob`'s
adapters as one factor pair per input file, merged by library.singular_methods when the engine asks.

`SingularLayer.svd` is a `LowRankJob`'s `svd`: the method's exact thin SVD of the merged delta (from its
small core), computed only when the engine reaches the layer, so a run holds one layer's factors at a time.
The engine truncates it to --new_rank (and reports the error) exactly as it does the factored `add`.
"""

from __future__ import annotations

import math

import torch

from library.lowrank import rank_cap
from library.merge_methods import MergeContext
from library.methods import FLAT_SPECTRUM_METHODS
from library.singular_methods import merge_lowrank_svd


def adapter_factors(adapter, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = the adapter's flattened delta exactly (alpha/rank folded in): a LoRA's
    factors, a LoHa/LoKr's exact ones when their rank is below min(out, in), else the identity factorisation
    of the dense delta (exact, rank min(out, in))."""
    from networks.base import identity_factors

    if adapter.kind == "lora":
        return adapter.factors()
    if hasattr(adapter, "exact_factors") and adapter.exact_rank < min(shape[0], math.prod(shape[1:])):
        up, down = adapter.exact_factors()
        return up.float() * adapter.scale, down.float()
    return identity_factors(adapter.delta(shape).reshape(shape[0], -1).float())


class SingularLayer:
    """The merged delta of one layer by a singular-space method, as a lazy factor pair for the engine."""

    def __init__(self, job, settings):
        self.job = job
        self.settings = settings

    def tasks(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """One (w·up, down) per input file; several modules of one file on this weight (q, k, v of a fused
        qkv) are one task, their factors side by side."""
        per_slot: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.job.n_inputs)]
        for slot, adapter, weight in self.job.parts:
            up, down = adapter_factors(adapter, self.job.shape)
            per_slot[slot].append((up.reshape(up.shape[0], -1) * float(weight), down.reshape(down.shape[0], -1)))
        return [None if not pairs else (torch.cat([u for u, _ in pairs], 1), torch.cat([d for _, d in pairs], 0))
                for pairs in per_slot]

    def svd(self):
        """The exact thin SVD of the merged delta (a lowrank.RotatedSVD), computed on `settings.device`."""
        s = self.settings
        ctx = MergeContext(density=s.density, sign_method=s.sign_method, seed=s.seed, name=self.job.name,
                           singular=s.singular)
        keep = rank_cap(self.job.shape, s) if s.mode in FLAT_SPECTRUM_METHODS else None
        tasks = [None if t is None else (t[0].to(s.device), t[1].to(s.device)) for t in self.tasks()]
        return merge_lowrank_svd(s.mode, tasks, ctx, keep=keep, dtype=s.dtype)
