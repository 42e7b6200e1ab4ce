"""LoHa and LoKr as exact low-rank products, and the one place that decides when that form is used.

A LoHa delta (A₁B₁) ⊙ (A₂B₂) is exactly a rank r₁·r₂ product (row-wise Khatri–Rao products of the factors)
and a LoKr delta kron(W₁, W₂) exactly one of rank rank(W₁)·rank(W₂) (networks' `exact_factors`). So
svd_merge, resize and concat can keep them in the factored route, never forming the out × in delta, as long
as that is worth it. Two questions, two rules, both here:

- `fits_as_factors(rank, shape)`: are the factors (rank·(out + in) values) no larger than the weight
  (out·in)? Decides what is *written*: merge_lora's concat (factors or a dense `diff`) and the PEFT writer
  (formats/write.py: an exact LoRA form, or a refusal).
- `factored_is_cheaper(rank, shape, target_rank)`: is the engine's factored route (QR of the two stacked
  factors, SVD of the rank×rank core) cheaper than forming the delta and taking its randomized SVD?
  Decides how svd_merge / resize / flux_merge's svd modes *compute*. The constants come from
  bench/bench_lycoris_routes.py --crossover (see `factored_is_cheaper`).
"""

from __future__ import annotations

import math

import torch

from networks.base import Adapter


def exact_rank(adapter: Adapter) -> int | None:
    """Rank of the adapter's exact low-rank form: a LoRA's rank, r₁·r₂ for LoHa/LoKr, None for a full diff."""
    if adapter.kind == "lora":
        return adapter.rank
    return adapter.exact_rank if hasattr(adapter, "exact_factors") else None


def fits_as_factors(rank: int, shape: tuple[int, ...]) -> bool:
    """True when rank-`rank` factors of a weight of `shape` hold no more values than the weight itself."""
    rows, cols = shape[0], math.prod(shape[1:])
    return rank * (rows + cols) <= rows * cols


# Measured by `python -m bench.bench_lycoris_routes --crossover` (1 torch thread, fp32, shared 2-core VM; the
# engine's own jobs: LoKr adapters with decomposed w1/w2 of exact rank R, factored route against the
# randomized SVD of the delta with the default oversampling max(k, 10) and 2 power iterations). Per-job
# seconds fit
#   factored ≈ FACTORED_COST·(out + in)·R² + CORE_COST·R³     (two thin QRs; the R×R core SVD is float64)
#   dense    ≈ DENSE_COST·out·in·(2k + 10)                    (sketch of k + max(k, 10) ≤ 2k + 10 columns)
# Measured (ms, factored / dense), k = 16: 1280² R=64 6.0/42, R=192 38/46, R=256 73/44, R=512 328/49;
# 640² R=64 4.5/12, R=128 12.4/11.9, R=256 50/12; 320×2880 R=64 7.3/38, R=192 46/29. k = 64: 1280² R=256
# 102/223, R=512 526/167; 640² R=192 45/89, R=256 87/73. With these constants the rule picked the faster
# route in 18/18 cases at k = 64 and at k = 16 (near the crossover the two are within ~1.5×). At R ≥ min(out, in)
# the stacked factors are no thinner than the matrix (the factored SVD would itself fall back to a dense one).
FACTORED_COST = 2.4e-10
CORE_COST = 1.25e-9
DENSE_COST = 7.0e-10


def factored_is_cheaper(rank: int, shape: tuple[int, ...], target_rank: int) -> bool:
    """The engine's routing rule for an exact low-rank form of `rank` on a weight of `shape`, cut to `target_rank`."""
    rows, cols = shape[0], math.prod(shape[1:])
    if rank >= min(rows, cols):
        return False
    factored = FACTORED_COST * (rows + cols) * rank**2 + CORE_COST * rank**3
    dense = DENSE_COST * rows * cols * (2 * min(target_rank, rows, cols) + 10)
    return factored <= dense


class ExactFactors:
    """A LoHa/LoKr adapter as a part of a low-rank engine job: `.rank` and `.factors()` like a LoRA adapter.

    factors() returns (up [out, R], down [R, in·k·k]) in float32 with the adapter's scale folded into up, so
    up @ down = ΔW (flattened). The products are formed in float64 (exact for float32 or 16-bit inputs), and
    only when the engine fills its batch: a job holds the adapter, not its factors.
    """

    kind = "exact"

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    @property
    def rank(self) -> int:
        return int(self.adapter.exact_rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.adapter.exact_factors()
        return (up * self.adapter.scale).float(), down.float()


def lowrank_parts(adapters: list[Adapter], shape: tuple[int, ...], target_rank: int) -> list | None:
    """What the engine's factored route takes for the adapters of one layer (same order), or None for the dense
    route. Plain LoRAs always stay factored (the engine's factored SVD handles R ≥ min(out, in) itself); with a
    LoHa/LoKr among them, their exact factors are used when `factored_is_cheaper` for the stacked rank Σ Rᵢ.
    A full diff or a DoRA module (its delta depends on the base weight) sends the layer to the dense route."""
    if any(a.dora is not None for a in adapters):
        return None
    if all(a.kind == "lora" for a in adapters):
        return list(adapters)
    ranks = [exact_rank(a) for a in adapters]
    if any(r is None for r in ranks) or not factored_is_cheaper(sum(ranks), shape, target_rank):
        return None
    return [a if a.kind == "lora" else ExactFactors(a) for a in adapters]
