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
These are PEFT's `peft.utils.merge_utils` functions (and Power-Merge's, which copies them) with one
difference: DARE's random mask for tensor i comes from a generator seeded by (seed, target name, i), so
a result does not depend on the order of layers, the device, or how many other layers or files were
merged in the same run.

`merge_tensors` applies a method to dense tensors (full deltas: svd_merge_lora's delta-space modes).
`merge_factors` applies it to the lists of ups and of downs separately, as ComfyUI Power-Merge's
LoRA Merger and PEFT's non-SVD `add_weighted_adapter` do (merge_lora's factor-space `--mode`): an
approximation with cross terms, kept for compatibility.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from library import methods, singular_methods
from library.errors import LoraToolsError
from library.merge_methods_sparse import check_sparse_params, merge_breadcrumbs, merge_della
from library.methods import SIGN_METHODS

# ---------------------------------------------------------------------------------------------------------
# Building blocks


def stable_seed(seed: int, name: str) -> int:
    """The one per-(seed, name) seed of loratools, library.lowrank.stable_seed (DARE masks and SVD sketches)."""
    from library import lowrank

    return lowrank.stable_seed(seed, name)


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, name): stable across runs, orders and devices."""
    from library import lowrank

    return lowrank.generator_for(seed, name)


def dare_mask(shape: Sequence[int], density: float, seed: int, name: str) -> torch.Tensor:
    """Keep-mask (True = kept, probability `density`) for one tensor, drawn on the CPU so every device agrees."""
    return torch.rand(tuple(shape), generator=generator_for(seed, name)) < density


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the `int(density·numel)` largest |values| (PEFT's rule for k; density ≥ 1 keeps all).

    PEFT takes `topk(k)`, whose cost on a CPU grows with k: for one SDXL conv delta (14.7 M values, k half of
    them) it takes seconds, and it was most of a TIES merge of SDXL LoRAs (over 900 s for three). The same
    set is the values at or above the k-th largest one (`top_k_mask`); among values equal to it (a tie topk
    breaks arbitrarily) the first ones in memory order are kept.
    """
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    flat = tensor.abs().reshape(-1)
    return top_k_mask(flat, int(density * flat.numel())).reshape(tensor.shape)


def top_k_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest values of a 1-D tensor; of values equal to the k-th largest, the first in memory order."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = kth_largest(flat, k)
    mask = flat >= threshold
    extra = int(torch.count_nonzero(mask)) - k  # count_nonzero: a bool .sum() is 20× slower on CPU
    if extra > 0:  # more values equal the threshold than fit: the last ones in memory order go
        equal = (flat == threshold).nonzero().reshape(-1)
        mask[equal[equal.numel() - extra:]] = False
    return mask


# Values sampled to bracket the k-th largest before the exact selection (the bracket only saves time).
_BRACKET_SAMPLE = 1 << 16


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a 1-D tensor, exactly (k in 1..numel), as a 0-d tensor of its dtype.

    On the CPU numpy's introselect (`np.partition`, SIMD) finds it in about one pass: 7 ms for 2.5 M float32
    values where torch's `kthvalue` takes 50 ms and a sort of 65 k values alone 30 ms. Elsewhere (CUDA),
    a random sample gives a narrow bracket [lo, hi] that holds the answer with overwhelming probability, two
    comparisons count what lies outside it, and the exact selection runs on the few values inside; if the
    bracket misses, the full selection runs.
    """
    n = flat.numel()
    rank = n - k + 1  # the answer is the rank-th smallest
    if flat.device.type == "cpu":
        import numpy as np

        # float16 / bfloat16 widen to float32 exactly, so the selected value converts back exactly.
        values = flat.detach().numpy() if flat.dtype in (torch.float32, torch.float64) else flat.float().numpy()
        return torch.tensor(np.partition(values, rank - 1)[rank - 1]).to(flat.dtype)
    if n <= 4 * _BRACKET_SAMPLE:
        return flat.kthvalue(rank).values
    # A random sample (a fixed seed: the result is exact either way): a stride would follow the rows of a
    # low-rank delta and see only a few of its columns.
    picks = torch.randint(n, (_BRACKET_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(flat.device)
    sample = flat[picks].sort().values
    m = sample.numel()
    q = rank / n
    spread = 6.0 * (q * (1 - q) / m) ** 0.5 + 8.0 / m  # ±6 standard deviations of a sample quantile
    lo = sample[max(0, int((q - spread) * m))]
    hi = sample[min(m - 1, int((q + spread) * m))]
    below = int(torch.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < rank <= below + inside.numel():
        return inside.kthvalue(rank - below).values
    return flat.kthvalue(rank).values


def majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Elected sign per element (+1 on a tie, as PEFT): `total` = sign of Σ tᵢ, `frequency` = sign of Σ sign(tᵢ)."""
    if method == "total":
        summed = stacked.sum(dim=0)
    elif method == "frequency":
        summed = stacked.sign().sum(dim=0)
    else:
        raise LoraToolsError(f"majority sign method must be one of {', '.join(SIGN_METHODS)}, not {method!r}")
    return torch.where(summed >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σ of the agreeing entries / number of agreeing tasks (at least 1). Zeros never agree."""
    total = (weighted * agree).sum(dim=0)
    count = torch.count_nonzero(agree, dim=0).clamp_min(1)
    return total / count


# Entries of the stacked tasks per block of the TIES passes: 512 KiB of float32, so a block's temporaries (the
# T-fold products and signs) stay in L2; over whole tensors they cost 4× more, and torch's bool ops (a `>`
# mask, `where`, a bool count) 3–10× more than the float ones used instead.
_ELECT_BLOCK = 1 << 17


def _block_size(T: int) -> int:
    return max(1024, _ELECT_BLOCK // max(T, 1))


def _elect_block(tasks: torch.Tensor, method: str, scale: torch.Tensor | None) -> torch.Tensor:
    """disjoint_mean(wᵢ·tᵢ, sign(tᵢ) = majority_sign) of one block tasks [T, B] (overwritten).

    With the elected sign s = ±1 an entry agrees iff s·t > 0, and wᵢ·t over the agreeing entries is
    s·wᵢ·max(s·t, 0) (sign flips are exact). copysign(1, Σ) is +1 on a zero sum as PEFT's `Σ >= 0`: a sum of
    −0.0 needs all entries ±0, which give 0 either way.
    """
    summed = tasks.sum(dim=0) if method == "total" else tasks.sign().sum(dim=0)
    sign = torch.ones_like(summed).copysign_(summed)
    x = tasks.mul_(sign).clamp_min_(0)
    count = x.sign().sum(dim=0).clamp_min_(1)
    if scale is not None:
        x.mul_(scale)
    return x.sum(dim=0).mul_(sign).div_(count)


def _check_sign_method(method: str) -> None:
    if method not in SIGN_METHODS:
        raise LoraToolsError(f"majority sign method must be one of {', '.join(SIGN_METHODS)}, not {method!r}")


def _scale(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor | None:
    w = torch.tensor([float(x) for x in weights], dtype=like.dtype, device=like.device).reshape(-1, 1)
    return None if bool((w == 1).all()) else w


def elected_mean(kept: torch.Tensor, weights: Sequence[float], method: str) -> torch.Tensor:
    """TIES' merge of the pruned tasks kept [T, ...]: disjoint_mean(wᵢ·keptᵢ, sign(keptᵢ) = majority_sign),
    the same sums in the same order, block by block (kept is not modified)."""
    _check_sign_method(method)
    T = kept.shape[0]
    flat = kept.reshape(T, -1)
    out = torch.empty(flat.shape[1], dtype=kept.dtype, device=kept.device)
    scale, block = _scale(weights, kept), _block_size(T)
    for start in range(0, flat.shape[1], block):
        out[start:start + block] = _elect_block(flat[:, start:start + block].clone(), method, scale)
    return out.reshape(kept.shape[1:])


def _magnitude_threshold(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """(t, exact): the k-th largest |value| of a 1-D tensor, and whether |x| ≥ t selects exactly k values
    (False when values equal to t lie on both sides of rank k: then magnitude_mask's memory-order rule decides)."""
    n = flat.numel()
    if flat.device.type == "cpu":
        import numpy as np

        # Partitioned in place in one scratch copy: [:rank-1] holds values ≤ t, so t has ties across the
        # boundary iff their maximum is t.
        values = np.abs(flat.detach().numpy() if flat.dtype in (torch.float32, torch.float64) else flat.float().numpy())
        rank = n - k + 1
        values.partition(rank - 1)
        t = values[rank - 1]
        return torch.tensor(t).to(flat.dtype), not (rank > 1 and values[:rank - 1].max() == t)
    t = kth_largest(flat.abs(), k)
    return t, int(torch.count_nonzero(flat.abs() >= t)) == k


def _map_threads(fn, items: list) -> list:
    """fn over items on torch's CPU thread count: numpy's selection holds no GIL, so the tasks' thresholds
    run side by side as torch's own ops would."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1 or items[0].device.type != "cpu":
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def ties_merge(stacked: torch.Tensor, weights: Sequence[float], density: float, method: str) -> torch.Tensor:
    """TIES on the tasks stacked [T, ...] (overwritten): each task pruned to its int(density·numel) largest
    |values| (magnitude_mask), the sign elected on the unweighted pruned tasks, the mean of the agreeing
    weighted entries. The pruning is a per-task threshold applied block by block with the election, so every
    entry is read from memory once after the selection."""
    _check_sign_method(method)
    T = stacked.shape[0]
    flat = stacked.reshape(T, -1)
    n = flat.shape[1]
    k = int(density * n) if density < 1 else n
    keep_all = torch.tensor(float("-inf"), dtype=flat.dtype, device=flat.device)
    if 0 < k < n:
        selections = _map_threads(lambda row: _magnitude_threshold(row, k), list(flat))
    cuts = []
    for i, row in enumerate(flat):
        if k >= n or k <= 0:
            cuts.append(keep_all)
            if k <= 0:
                row.zero_()
            continue
        t, exact = selections[i]
        if not exact:
            row.mul_(top_k_mask(row.abs(), k))  # ties at the threshold: the memory-order rule, pruned here
            t = keep_all
        # |x| > nextafter(t, −∞) is |x| ≥ t (no float lies between), in the form F.threshold takes
        cuts.append(torch.nextafter(t, keep_all) if bool(t > keep_all) else t)
    out = torch.empty(n, dtype=flat.dtype, device=flat.device)
    scale, block = _scale(weights, flat), _block_size(T)
    magnitude = torch.empty((T, min(block, n)), dtype=flat.dtype, device=flat.device)
    for start in range(0, n, block):
        tasks = flat[:, start:start + block]
        mags = magnitude[:, :tasks.shape[1]]
        torch.abs(tasks, out=mags)
        for i in range(T):
            torch.nn.functional.threshold_(mags[i], float(cuts[i]), 0.0)
        out[start:start + block] = _elect_block(mags.copysign_(tasks), method, scale)
    return out.reshape(stacked.shape[1:])


@dataclass
class MergeContext:
    """What a method may need besides the tensors.

    `name` identifies the target (e.g. the canonical weight key) for DARE's seeding; `masks` overrides
    the DARE keep-masks (one per tensor), which lets tests compare against an outside implementation.
    """

    density: float = 1.0
    sign_method: str = "total"
    seed: int = 0
    name: str = ""
    masks: Sequence[torch.Tensor] | None = field(default=None, repr=False)
    rescale: bool = True  # DARE's 1/density on the kept entries (merge_models.py --no_rescale: DareMerge's default)
    epsilon: float = 0.1  # della: half-width of the keep probabilities around density
    lambda_: float = 1.0  # della: scale of the merged delta
    gamma: float = 0.01  # breadcrumbs: share of the largest magnitudes dropped (mergekit's default)
    singular: methods.SingularParams | None = None  # tsv / iso_c / iso_cts / knots / np_lora (None = defaults)


def _weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return torch.stack([t * float(w) for t, w in zip(tensors, weights)])


def _dare(tensors: Sequence[torch.Tensor], ctx: MergeContext) -> list[torch.Tensor]:
    if ctx.density <= 0:
        raise LoraToolsError(f"DARE needs a density above 0, got {ctx.density}", key=ctx.name or None)
    if ctx.density >= 1:
        return list(tensors)
    masks = ctx.masks
    if masks is None:
        masks = [dare_mask(t.shape, ctx.density, ctx.seed, f"{ctx.name}:{i}") for i, t in enumerate(tensors)]
    kept = [t * m.to(t.device, torch.bool) for t, m in zip(tensors, masks)]
    return [t / ctx.density for t in kept] if ctx.rescale else kept


# ---------------------------------------------------------------------------------------------------------
# Methods


def merge_add(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    return _weighted(tensors, weights).sum(dim=0)


def merge_magnitude_prune(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    pruned = [t * magnitude_mask(t, ctx.density) for t in tensors]
    return _weighted(pruned, weights).sum(dim=0)


def merge_ties(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    # the sign is elected on the unweighted tensors, as PEFT
    return ties_merge(torch.stack(list(tensors)), weights, ctx.density, ctx.sign_method)


def merge_dare_linear(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    return _weighted(_dare(tensors, ctx), weights).sum(dim=0)


def merge_dare_ties(tensors, weights, ctx: MergeContext) -> torch.Tensor:
    return elected_mean(torch.stack(_dare(tensors, ctx)), weights, ctx.sign_method)


MergeFn = Callable[[Sequence[torch.Tensor], Sequence[float], MergeContext], torch.Tensor]

FUNCTIONS: dict[str, MergeFn] = {"add": merge_add, "ties": merge_ties, "dare_linear": merge_dare_linear,
                                 "dare_ties": merge_dare_ties, "magnitude_prune": merge_magnitude_prune}
FUNCTIONS.update(della=merge_della, breadcrumbs=merge_breadcrumbs)  # library/merge_methods_sparse.py
FUNCTIONS.update(singular_methods.DENSE_FUNCTIONS)  # tsv, iso_c, iso_cts, knots, np_lora on dense deltas


@dataclass(frozen=True)
class MergeMethod:
    """A method of library.methods (its name, parameters, aliases, randomness) with its tensor function."""

    name: str
    fn: MergeFn
    params: tuple[str, ...]
    aliases: tuple[str, ...]
    random: bool
    summary: str


def _bind(spec: methods.Method) -> MergeMethod:
    return MergeMethod(spec.name, FUNCTIONS[spec.name], spec.params, (*spec.delta_aliases, *spec.aliases),
                       spec.random, spec.summary)


# Every tensor method of the registry, under each of its names (concat is no tensor method: lora_combine).
METHODS: dict[str, MergeMethod] = {label: bound for spec in methods.METHODS if spec.name in FUNCTIONS
                                   for bound in (_bind(spec),) for label in (spec.name, *bound.aliases)}
METHOD_NAMES = tuple(name for name in methods.names(methods.DELTA))


def get_method(name: str) -> MergeMethod:
    """The method registered as `name` (Power-Merge's `add_svd`, `ties_svd`, … and PEFT's names are aliases)."""
    try:
        return METHODS[name]
    except KeyError:
        raise LoraToolsError(f"unknown merge mode {name!r}; use one of {', '.join(sorted(METHODS))}") from None


def check_context(method: MergeMethod, ctx: MergeContext) -> None:
    if "density" in method.params and not 0 <= ctx.density <= 1:
        raise LoraToolsError(f"--density must be in [0, 1], got {ctx.density}")
    if "sign_method" in method.params and ctx.sign_method not in SIGN_METHODS:
        raise LoraToolsError(f"majority sign method must be one of {', '.join(SIGN_METHODS)}, not {ctx.sign_method!r}")
    check_sparse_params(method.name, ctx)


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  ctx: MergeContext | None = None) -> torch.Tensor:
    """Merge same-shaped dense tensors (e.g. full deltas of one target) with the named method."""
    ctx = ctx or MergeContext()
    spec = get_method(method)
    check_context(spec, ctx)
    if len(tensors) != len(weights) or not tensors:
        raise LoraToolsError(f"{len(tensors)} tensors but {len(weights)} weights", key=ctx.name or None)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise LoraToolsError(f"cannot merge tensors of different shapes {sorted(shapes)}", key=ctx.name or None)
    return spec.fn(tensors, weights, ctx)


def factor_weights(weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """Per-factor weights (up, down) so that one LoRA merged alone keeps its strength w exactly.

    √|w| on both factors and the sign on the down (PEFT's rule since #2918): the product of the two
    weights is w, including negative w, where Power-Merge v1 multiplies both factors by w (w²).
    """
    ups = [abs(float(w)) ** 0.5 for w in weights]
    downs = [(1.0 if w >= 0 else -1.0) * abs(float(w)) ** 0.5 for w in weights]
    return ups, downs


def merge_factors(method: str, ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor], weights: Sequence[float],
                  ctx: MergeContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor-space merge: the method applied to the ups and to the downs separately (equal ranks required).

    Power-Merge's and PEFT's non-SVD modes: the product of the merged factors has cross terms upᵢ·downⱼ,
    so it approximates Σ wᵢ upᵢ·downᵢ only; svd_merge_lora's delta-space modes are the exact ones.
    Masks and sign elections are independent for the two sides; DARE seeds them from
    "<name>.lora_up" and "<name>.lora_down". Scales (alpha/rank) must already be folded into the factors.
    """
    ctx = ctx or MergeContext()
    if ctx.masks is not None:
        raise LoraToolsError("explicit masks are per dense tensor; merge_factors draws its own", key=ctx.name or None)
    ranks = {int(u.shape[1]) for u in ups} | {int(d.shape[0]) for d in downs}
    if len(ranks) > 1:
        raise LoraToolsError(f"factor-space merging needs equal ranks, got {sorted(ranks)}; use svd_merge_lora.py",
                             key=ctx.name or None)
    up_w, down_w = factor_weights(weights)
    # Every parameter carries over; a scale of the merged result (della's λ > 0) goes √λ on each side.
    side = dict(lambda_=ctx.lambda_ ** 0.5) if ctx.lambda_ > 0 else {}
    up_ctx = dataclasses.replace(ctx, name=f"{ctx.name}.lora_up", **side)
    down_ctx = dataclasses.replace(ctx, name=f"{ctx.name}.lora_down", **side)
    return merge_tensors(method, ups, up_w, up_ctx), merge_tensors(method, downs, down_w, down_ctx)
