"""The per-tensor-statistics merges of merge_models.py (ties, magnitude_prune, dare_*, slerp, --protect_a) in
chunks: a first pass over the key measures what the method needs of the whole tensor, a second pass merges
chunk by chunk with it, so no input tensor is ever held whole.

  magnitude (ties, magnitude_prune; --protect_a): per task vector, the k-th largest |τ| (k = int(density·n))
      and how many of the values equal to it are kept (the first ones in memory order, as
      merge_methods.top_k_mask). The first pass fills one float32 buffer of |τ| (the only whole-tensor
      memory: 4 bytes per element, one task at a time) and selects in it in place.
  DARE: nothing: the keep-draws of task j come from the generator of (seed, "<key>:<j>"), whose CPU stream
      split into consecutive draws is the same stream (torch.rand of m then of n − m equals rand of n).
  slerp: ⟨a, b⟩, ‖a‖², ‖b‖² in float64, summed over fixed blocks of STATS_BLOCK elements in order, so the
      coefficients are the same whatever the merge's chunk size (model_merge.slerp uses the same sums).

The chunk kernel does merge_key's operations, elementwise and in the same order, so a chunked key equals the
whole-tensor merge_key bit for bit (tests pin it); each read of the first pass goes to the hasher as well
(library.stream_hash skips bytes it has), and the second pass usually finds the key in the page cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from library.errors import LoraToolsError
from library.merge_methods import elected_mean, generator_for

STATS_BLOCK = 1 << 16  # elements per block of the first pass (and of slerp's float64 sums)
SLERP_PARALLEL = 0.9995  # mergekit's threshold: above it the angle is too small for a stable slerp
_NO_ELECTION = {"ties": "magnitude_prune", "dare_ties": "dare_linear"}
MAGNITUDE_METHODS = ("ties", "magnitude_prune")
DARE_METHODS = ("dare_linear", "dare_ties")
ELECTING = ("ties", "dare_ties")


@dataclass
class MagnitudeCut:
    """Which entries of one flattened tensor lie among its k largest |values|: those above `threshold`, and of
    those equal to it the first `equal_left` met in memory order (decremented as chunks go by)."""

    threshold: float
    equal_left: int
    keep_equal: bool  # every value equal to the threshold is kept (no count needed per chunk)

    @classmethod
    def select(cls, magnitudes: np.ndarray, k: int) -> MagnitudeCut:
        """The cut of the k largest of `magnitudes` (a float array, reordered in place)."""
        n = magnitudes.size
        if k >= n:
            return cls(-math.inf, 0, True)
        if k <= 0:
            return cls(math.inf, 0, False)
        rank = n - k  # 0-based position of the k-th largest in increasing order
        magnitudes.partition(rank)
        t = magnitudes[rank]
        above = int(np.count_nonzero(magnitudes[rank + 1:] > t))
        equal_kept = k - above
        # every value equal to t is kept iff none lies below position `rank`
        all_equal_kept = rank == 0 or magnitudes[:rank].max() < t
        return cls(float(t), equal_kept, all_equal_kept)

    def keep(self, magnitudes: torch.Tensor) -> torch.Tensor:
        """The keep-mask of the next chunk of |values| (chunks taken in order)."""
        if self.keep_equal:
            return magnitudes >= self.threshold
        mask = magnitudes > self.threshold
        if self.equal_left > 0:
            equal = (magnitudes == self.threshold).nonzero().reshape(-1)[:self.equal_left]
            mask[equal] = True
            self.equal_left -= equal.numel()
        return mask


def slerp_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(⟨a, b⟩, ‖a‖², ‖b‖²) of two flat tensors in float64, block by block in order (chunk-size independent)."""
    dot = aa = bb = 0.0
    for s in range(0, a.numel(), STATS_BLOCK):
        x, y = a[s:s + STATS_BLOCK].double(), b[s:s + STATS_BLOCK].double()
        dot += float(torch.dot(x, y))
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
    return dot, aa, bb


def slerp_coefficients(sums: tuple[float, float, float], t: float) -> tuple[float, float] | None:
    """(ca, cb) of slerp(a, b, t) = ca·a + cb·b, sin((1−t)θ)/sin θ and sin(tθ)/sin θ; None where a or b is zero
    or they are (anti)parallel beyond SLERP_PARALLEL (then it is lerp, a + t·(b − a))."""
    dot, aa, bb = sums
    if aa == 0 or bb == 0:
        return None
    cos = dot / math.sqrt(aa * bb)
    if abs(cos) > SLERP_PARALLEL:
        return None
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_apply(a: torch.Tensor, b: torch.Tensor, t: float, coefficients: tuple[float, float] | None) -> torch.Tensor:
    if coefficients is None:
        return a + t * (b - a)
    return coefficients[0] * a + coefficients[1] * b


@dataclass
class KeyStatistics:
    """What the second pass needs of one key: a magnitude cut per task vector, the protect cut, DARE's
    generators, slerp's t and coefficients."""

    cuts: list[MagnitudeCut] = field(default_factory=list)
    protect: MagnitudeCut | None = None
    generators: list[torch.Generator] = field(default_factory=list)
    slerp: tuple[float, tuple[float, float] | None] | None = None


def effective_method(settings) -> tuple[str, str]:
    """(the merge_methods function, its sign method) of the settings: add_difference is `add`; sign method
    `off` turns ties into magnitude_prune and dare_ties into dare_linear (DareMerge's "no election")."""
    fn = "add" if settings.method == "add_difference" else settings.method
    if settings.sign_method == "off":
        return _NO_ELECTION.get(fn, fn), "total"
    return fn, settings.sign_method


Read = Callable[[int, int], torch.Tensor]  # (start, stop) → that slice of a flattened input, compute dtype


def measure(key: str, count: int, settings, models: Sequence[Read], base: Read | None,
            strength: float) -> KeyStatistics:
    """The first pass over a key of `count` flat elements: `models[i](start, stop)` reads model i (A first),
    `base` the base (None without one)."""
    stats = KeyStatistics()
    if settings.method == "slerp":
        t = strength * settings.ratios[1] / sum(settings.ratios)
        sums = [0.0, 0.0, 0.0]
        for s in range(0, count, STATS_BLOCK):
            e = min(count, s + STATS_BLOCK)
            sums = [x + y for x, y in zip(sums, slerp_sums(models[0](s, e), models[1](s, e)))]
        stats.slerp = (t, slerp_coefficients(tuple(sums), t))
        return stats
    anchor = base if base is not None else models[0]
    tasks = models[0 if base is not None else 1:]
    fn, _ = effective_method(settings)
    if fn in MAGNITUDE_METHODS and settings.density < 1:
        stats.cuts = [_cut(count, int(settings.density * count), read, anchor) for read in tasks]
    if fn in DARE_METHODS and settings.density < 1:
        if settings.density <= 0:
            raise LoraToolsError(f"DARE needs a density above 0, got {settings.density}", key=key)
        stats.generators = [generator_for(settings.seed, f"{key}:{j}") for j in range(len(tasks))]
    if settings.protect > 0 and base is not None:
        stats.protect = _cut(count, int(settings.protect * count), models[0], base) if settings.protect < 1 \
            else MagnitudeCut(-math.inf, 0, True)
    return stats


def _cut(count: int, k: int, read: Read, anchor: Read) -> MagnitudeCut:
    """The cut of the k largest |read − anchor|, from one buffer of the whole key's magnitudes."""
    if k >= count:
        return MagnitudeCut(-math.inf, 0, True)
    if k <= 0:
        return MagnitudeCut(math.inf, 0, False)
    magnitudes = None
    for s in range(0, count, STATS_BLOCK):
        e = min(count, s + STATS_BLOCK)
        tau = read(s, e).sub_(anchor(s, e)).abs_().cpu()
        if magnitudes is None:
            magnitudes = torch.empty(count, dtype=tau.dtype)
        magnitudes[s:e] = tau
    return MagnitudeCut.select(magnitudes.numpy(), k)


def merge_chunk(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, settings, stats: KeyStatistics,
                strength: float, mask: torch.Tensor | None) -> torch.Tensor:
    """merge_key's result on the next chunk of every input (model A first): task vectors against the base (or
    A), pruned by the cuts or DARE's draws, summed or elected, A moved towards the result by `strength`,
    A kept where --protect_a or the mask says so. Chunks must come in order (the cuts and draws advance)."""
    a = tensors[0]
    if stats.slerp is not None:
        out = slerp_apply(a, tensors[1], *stats.slerp)
    else:
        anchor = base if base is not None else a
        first = 0 if base is not None else 1
        fn, sign_method = effective_method(settings)
        taus = [t - anchor for t in tensors[first:]]
        weights = settings.ratios[first:]
        if stats.cuts:
            taus = [_pruned(fn, tau, cut) for tau, cut in zip(taus, stats.cuts)]
        elif stats.generators:
            taus = [tau * (torch.rand(tau.numel(), generator=g) < settings.density).to(tau.device)
                    for tau, g in zip(taus, stats.generators)]
            if settings.rescale:
                taus = [tau / settings.density for tau in taus]
        if fn in ELECTING:
            combined = elected_mean(torch.stack(taus), weights, sign_method)
        else:
            combined = torch.stack([tau * float(w) for tau, w in zip(taus, weights)]).sum(dim=0)
        merged = anchor + combined
        out = merged if strength == 1 else a + strength * (merged - a)
    if stats.protect is not None:
        out = torch.where(stats.protect.keep((a - base).abs()), a, out)
    if mask is not None:
        out = torch.where(mask.to(out.device), out, a)
    return out


def _pruned(fn: str, tau: torch.Tensor, cut: MagnitudeCut) -> torch.Tensor:
    # merge_methods.ties_merge zeroes a task that keeps nothing (+0); elsewhere a dropped entry is τ·0 (±0)
    if fn == "ties" and cut.threshold == math.inf:
        return torch.zeros_like(tau)
    return tau * cut.keep(tau.abs())
