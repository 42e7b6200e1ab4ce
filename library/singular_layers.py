"""svd_merge's layers for the singular-space methods (tsv, iso_c, iso_cts, knots, np_lora): a `LayerJob`'s
adapters as one factor pair per input file, merged by library.singular_methods when the engine asks.

`SingularLayer` is a low-rank part of a `LowRankJob`: its rank is known up front (so the engine can batch
layers of equal shape) and its factors are computed only when the engine fills that batch, so a run holds
the merged factors of one batch at a time, never those of the whole model. The engine then takes their
exact factored SVD and truncates it to --new_rank as for `add`.
"""

from __future__ import annotations

import math

import torch

from library.lowrank import rank_cap
from library.merge_methods import MergeContext
from library.methods import FLAT_SPECTRUM_METHODS
from library.singular_methods import merge_lowrank


def adapter_rank(adapter, shape: tuple[int, ...]) -> int:
    """Inner size of `adapter_factors`: a LoRA's rank, a LoHa/LoKr's exact rank when smaller than the
    matrix, else min(out, in) (the exact identity factorisation of its dense delta)."""
    full = min(shape[0], math.prod(shape[1:]))
    if adapter.kind == "lora":
        return int(adapter.rank)
    if hasattr(adapter, "exact_factors") and adapter.exact_rank < full:
        return int(adapter.exact_rank)
    return full


def adapter_factors(adapter, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = the adapter's flattened delta exactly (alpha/rank folded in)."""
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
        out_dim, in_dim = job.shape[0], math.prod(job.shape[1:])
        total = sum(adapter_rank(adapter, job.shape) for _, adapter, _ in job.parts)
        # Every method's result has at most this inner size; the factors are zero-padded to it exactly.
        self.rank = min(out_dim, in_dim, total)

    def tasks(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """One (w·up, down) per input file; several modules of one file on this weight (q, k, v of a fused
        qkv) are one task, their factors side by side."""
        per_slot: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.job.n_inputs)]
        for slot, adapter, weight in self.job.parts:
            up, down = adapter_factors(adapter, self.job.shape)
            per_slot[slot].append((up.reshape(up.shape[0], -1) * float(weight), down.reshape(down.shape[0], -1)))
        return [None if not pairs else (torch.cat([u for u, _ in pairs], 1), torch.cat([d for _, d in pairs], 0))
                for pairs in per_slot]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        ctx = MergeContext(density=s.density, sign_method=s.sign_method, seed=s.seed, name=self.job.name,
                           singular=s.singular)
        keep = rank_cap(self.job.shape, s) if s.mode in FLAT_SPECTRUM_METHODS else None
        tasks = [None if t is None else (t[0].to(s.device), t[1].to(s.device)) for t in self.tasks()]
        up, down = merge_lowrank(s.mode, tasks, ctx, keep=keep, dtype=s.dtype)
        pad = self.rank - up.shape[1]
        if pad > 0:
            up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
            down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
        return up.cpu(), down.cpu()  # the engine fills its batch on the CPU, then moves it
