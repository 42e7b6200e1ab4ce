"""Merge methods over lists of same-shaped tensors, registered by name (PEFT's semantics, without its bugs).

Each method takes the tensors tᵢ and weights wᵢ and returns one tensor:
  add              Σ wᵢ tᵢ                                        (task arithmetic)
  magnitude_prune  keep the top `density` share of |tᵢ| per tensor, then Σ wᵢ tᵢ
  ties             magnitude-prune, elect a sign per element from the unweighted pruned tensors
                   (`total`: sign of Σ; `frequency`: sign of Σ sign), then the mean of the weighted
                   tensors that agree with it
  dare_linear      drop each element with probability 1 − density and rescale the rest by 1/density
                   (PEFT before #3152 and Power-Merge v1 skipped the rescale; we do not), then Σ wᵢ tᵢ
  dare_ties        DARE drop-and-rescale, then the TIES sign election and disjoint mean
Random masks come from a generator seeded by (seed, target name), so a result does not depend on the
order of layers, the device, or how many other layers were merged in the same run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SIGN_METHODS = ("total", "frequency")


def generator_for(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, name): stable across runs, orders and devices."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    # Masks are always drawn on the CPU so the same seed gives the same mask on CUDA too.
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the `int(density·numel)` largest |values| (PEFT's rule for k)."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    if k > 0:
        mask[tensor.abs().reshape(-1).topk(k).indices] = True
    return mask.reshape(tensor.shape)


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < density


def majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    if method == "total":
        summed = stacked.sum(dim=0)
    elif method == "frequency":
        summed = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority sign method must be one of {SIGN_METHODS}, not {method!r}")
    return torch.where(summed >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σ of the agreeing entries / number of agreeing tasks (at least 1)."""
    total = (weighted * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return total / count


@dataclass
class MergeContext:
    """What a method may need besides the tensors: density, sign rule, and the random stream."""

    density: float = 1.0
    sign_method: str = "total"
    seed: int = 0
    name: str = ""


def _weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return torch.stack([t * w for t, w in zip(tensors, weights)])


def merge_add(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    return _weighted(tensors, weights).sum(dim=0)


def merge_magnitude_prune(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    pruned = [t * magnitude_mask(t, ctx.density) for t in tensors]
    return _weighted(pruned, weights).sum(dim=0)


def merge_ties(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    pruned = torch.stack([t * magnitude_mask(t, ctx.density) for t in tensors])
    sign = majority_sign(pruned, ctx.sign_method)
    weighted = _weighted(list(pruned), weights)
    return disjoint_mean(weighted, pruned.sign() == sign)


def _dare(tensors, ctx: MergeContext) -> list[torch.Tensor]:
    if ctx.density <= 0:
        raise ValueError("DARE needs a density above 0")
    generator = generator_for(ctx.seed, ctx.name)
    return [t * dare_mask(t.shape, ctx.density, generator).to(t.device) / ctx.density for t in tensors]


def merge_dare_linear(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    return _weighted(_dare(tensors, ctx), weights).sum(dim=0)


def merge_dare_ties(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    kept = torch.stack(_dare(tensors, ctx))
    sign = majority_sign(kept, ctx.sign_method)
    return disjoint_mean(_weighted(list(kept), weights), kept.sign() == sign)


MergeFn = Callable[[Sequence[torch.Tensor], Sequence[float], MergeContext], torch.Tensor]
METHODS: dict[str, MergeFn] = {
    "add": merge_add,
    "ties": merge_ties,
    "dare_linear": merge_dare_linear,
    "dare_ties": merge_dare_ties,
    "magnitude_prune": merge_magnitude_prune,
}
USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
USES_SIGN = {"ties", "dare_ties"}


def resolve_method(name: str) -> str:
    """Canonical method name; Power-Merge's `add_svd`, `ties_svd`, ... are accepted as aliases."""
    base = name[:-4] if name.endswith("_svd") else name
    if base not in METHODS:
        raise ValueError(f"unknown merge mode {name!r}; use one of {', '.join(METHODS)}")
    return base


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  ctx: MergeContext) -> torch.Tensor:
    if not 0 <= ctx.density <= 1:
        raise ValueError(f"density must be in [0, 1], got {ctx.density}")
    return METHODS[resolve_method(method)](tensors, weights, ctx)
