"""Checkpoint merging, one key at a time: the methods of library.methods' `model` space on full weights.

One ratio per model (sd-scripts' merge_models convention): rᵢ weights model i's contribution, and a
ratio 0 means the model contributes nothing. With models M₁ = A, M₂ = B, … and a base C:

  weighted_sum      Σ rᵢ·Mᵢ (default rᵢ = 1/n; ratios are not normalised, as in sd-scripts)
  add_difference    C + Σ rᵢ·(Mᵢ − C): with ratios (1, r) this is A + r·(B − C) (needs --base)
  task_arithmetic   the same formula; without --base, C is A (so A's ratio has no effect)
  ties, dare_linear, dare_ties, magnitude_prune
                    C + f(τ, r) with task vectors τᵢ = Mᵢ − C and library.merge_methods' f (TIES/DARE as
                    for LoRAs: density, sign election total|frequency, DARE's 1/density rescale); without
                    --base C is A and only B, C, … give task vectors (DareMerge's B − A); --majority_sign_method
                    off turns ties into magnitude_prune and dare_ties into dare_linear (no election)
  slerp             two models: spherical interpolation from A to B at t = r_B / (r_A + r_B) (lerp where
                    they are (anti)parallel or one is zero), default ratios (0.5, 0.5)
Then the per-key strength s (block weights, key weights, te ratio) moves A towards that result:
W = A + s·(M − A) (slerp: t·s), so s = 0 keeps A and s = 1 is the merge above; DareMerge's ratios mean
the opposite (1 keeps A). `protect` keeps A where |A − C| is in A's largest `protect` share per tensor
(DareMerge's magnitude mask "below" against a base); a mask keeps A where it is False.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from library.errors import LoraToolsError
from library.merge_methods import MergeContext, magnitude_mask, merge_tensors
from library.model_merge_chunked import effective_method, slerp_apply, slerp_coefficients, slerp_sums

BASE_METHODS = ("add", "add_difference", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class MergeSettings:
    method: str  # a registry name of the model space (task_arithmetic resolved to "add")
    ratios: tuple[float, ...]
    density: float = 1.0
    seed: int = 0
    sign_method: str = "total"  # total | frequency | off
    rescale: bool = True
    protect: float = 0.0
    has_base: bool = False

    def check(self, n_models: int) -> None:
        if len(self.ratios) != n_models:
            raise LoraToolsError(f"--ratios has {len(self.ratios)} values but {n_models} models were given")
        if self.method == "slerp" and (n_models != 2 or self.has_base):
            raise LoraToolsError("slerp interpolates exactly two models and takes no --base")
        if self.method == "weighted_sum" and self.has_base:
            raise LoraToolsError("weighted_sum takes no --base (use add_difference or task_arithmetic)")
        if self.method == "add_difference" and not self.has_base:
            raise LoraToolsError("add_difference needs --base (A + r·(B − base))")
        if self.protect and not self.has_base:
            raise LoraToolsError("--protect_a needs --base (it protects A's largest changes from the base)")
        if self.method == "slerp" and sum(self.ratios) == 0:
            raise LoraToolsError("slerp needs ratios with a non-zero sum (t = r_B / (r_A + r_B))")


def default_ratios(method: str, n_models: int) -> tuple[float, ...]:
    if method == "weighted_sum" or method == "slerp":
        return (1.0 / n_models,) * n_models
    return (1.0,) * n_models


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b, θ the angle between the flattened tensors (its cosine from
    float64 sums in fixed blocks: the chunked merge's own, so both give the same bytes)."""
    return slerp_apply(a, b, t, slerp_coefficients(slerp_sums(a.reshape(-1), b.reshape(-1)), t))


LINEAR_METHODS = ("weighted_sum", "add_difference", "add")


def is_elementwise(settings: MergeSettings, normalize: str | None = None) -> bool:
    """True when every output element depends only on the same element of the inputs (no per-tensor norm,
    rank or random draw): the merge may then go through a tensor chunk by chunk with the same result."""
    return settings.method in LINEAR_METHODS and not (settings.protect > 0 and settings.has_base) and normalize is None


def linear_merge(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, settings: MergeSettings,
                 strength: float = 1.0, mask: torch.Tensor | None = None,
                 scratch: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """weighted_sum, add_difference and task_arithmetic ("add"), then the strength and the mask, on whole
    tensors or on any same slice of them. Only elementwise multiplies, adds and selects, each rounded on
    its own (no `add_(alpha=)`, whose vector loop may fuse into an FMA and its scalar tail not), so an
    element's value does not depend on where a chunk starts: chunked and whole results are bit-identical.
    The inputs are not changed (a hashing thread may still be reading their buffers). `scratch(i)` gives
    reusable buffers 0 and 1 shaped like the inputs (a chunked pass's, kept in cache) for the results, which
    are then views of them; without it they are new tensors. Either way the same operations run."""
    a = tensors[0]

    def buffer(slot: int) -> torch.Tensor | None:
        return scratch(slot) if scratch is not None else None

    if settings.method == "weighted_sum":
        merged = torch.mul(a, float(settings.ratios[0]), out=buffer(0))
        for r, t in zip(settings.ratios[1:], tensors[1:]):
            merged += torch.mul(t, float(r), out=buffer(1))
    else:
        anchor = base if base is not None else a
        first = 0 if base is not None else 1
        total = None
        for r, t in zip(settings.ratios[first:], tensors[first:]):
            tau = torch.sub(t, anchor, out=buffer(0 if total is None else 1))
            tau *= float(r)
            total = tau if total is None else total.add_(tau)
        merged = (anchor.clone() if scratch is None else buffer(0).copy_(anchor)) if total is None \
            else total.add_(anchor)
    if strength != 1:
        merged = merged.sub_(a).mul_(float(strength)).add_(a)
    if mask is not None:
        merged = torch.where(mask.to(merged.device), merged, a, out=buffer(1))
    return merged


def merge_key(key: str, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, settings: MergeSettings,
              strength: float = 1.0, mask: torch.Tensor | None = None,
              dare_masks: Sequence[torch.Tensor] | None = None, consume: bool = False) -> torch.Tensor:
    """The merged value of `key` from the models' tensors (model A first) and the base's, all one dtype.

    DARE draws one keep-mask per task vector from (seed, "<key>:<j>"), j its position among the task
    vectors (B is 0 without --base, 1 with it), so a key's result depends on nothing but its own tensors;
    `dare_masks` replaces them (tests). With `consume`, the tensors of B, C, … become their task vectors in
    place (the streaming run's own copies: n − 1 fewer full-size temporaries)."""
    a = tensors[0]
    if settings.method in LINEAR_METHODS and not (settings.protect > 0 and base is not None):
        return linear_merge(tensors, base, settings, strength, mask)
    if settings.method == "slerp":
        r_a, r_b = settings.ratios
        merged = slerp(a, tensors[1], strength * r_b / (r_a + r_b))
        strength = 1.0
    else:
        anchor = base if base is not None else a
        pairs = list(zip(tensors, settings.ratios))[(0 if base is not None else 1):]
        fn, sign_method = effective_method(settings)
        ctx = MergeContext(settings.density, sign_method, settings.seed, key, dare_masks, settings.rescale)
        taus = [t.sub_(anchor) if consume and t is not a else t - anchor for t, _ in pairs]
        merged = anchor + merge_tensors(fn, taus, [r for _, r in pairs], ctx)
        del taus
    out = merged if strength == 1 else a + strength * (merged - a)
    if settings.protect > 0 and base is not None:
        out = torch.where(magnitude_mask((a - base).abs(), settings.protect), a, out)
    if mask is not None:
        out = torch.where(mask.to(out.device), out, a)
    return out
