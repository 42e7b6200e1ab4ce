"""library/lowrank.py micro-benchmark: factored SVD and randomized SVD against a dense thin SVD.

  factored: Σ of K rank-r LoRAs on one Flux-shaped layer, factored_svd vs dense product + torch.linalg.svd;
            reports the time ratio and the largest singular-value difference (relative to σ₀).
  randomized: a dense matrix with σᵢ = i^-decay, randomized_svd (default oversampling / power iterations)
            vs the exact thin SVD; reports the time ratio and the excess truncation error.

    python -m bench.bench_lowrank [--shapes 3072x3072,12288x3072] [--k 4] [--r 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import report
from library.lowrank import factored_svd, randomized_svd


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_factored(out_dim: int, in_dim: int, k: int, r: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(out_dim, r, generator=g) * 0.02 for _ in range(k)]
    downs = [torch.randn(r, in_dim, generator=g) * 0.02 for _ in range(k)]
    weights = [1.0 / (i + 1) for i in range(k)]
    ours, t_ours = timed(lambda: factored_svd(ups, downs, weights))
    dense, t_dense = timed(lambda: torch.linalg.svd(sum(w * u @ d for u, d, w in zip(ups, downs, weights)),
                                                    full_matrices=False).S)
    diff = float((ours.S[: k * r] - dense[: k * r]).abs().max() / dense[0])
    return {"case": "factored", "shape": f"{out_dim}x{in_dim}", "K": k, "r": r, "ours_s": round(t_ours, 3),
            "dense_s": round(t_dense, 2), "speedup": round(t_dense / t_ours, 1), "max_sv_diff_rel": float(f"{diff:.1e}")}


def bench_randomized(out_dim: int, in_dim: int, rank: int, decay: float) -> dict:
    g = torch.Generator().manual_seed(1)
    n = min(out_dim, in_dim)
    u, _ = torch.linalg.qr(torch.randn(out_dim, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_dim, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -decay
    matrix = (u * s) @ v.T
    approx, t_ours = timed(lambda: randomized_svd(matrix, rank, seed=0))
    _, t_dense = timed(lambda: torch.linalg.svd(matrix, full_matrices=False))
    optimal = float(s[rank:].double().norm())
    err = float((matrix.double() - approx.matrix().double()).norm())
    return {"case": "randomized", "shape": f"{out_dim}x{in_dim}", "rank": rank, "decay": decay,
            "ours_s": round(t_ours, 3), "dense_s": round(t_dense, 2), "speedup": round(t_dense / t_ours, 1),
            "excess_error_pct": round(100 * (err / optimal - 1), 3) if optimal > 0 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="3072x3072")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    for text in args.shapes.split(","):
        out_dim, in_dim = (int(x) for x in text.split("x"))
        report("bench_lowrank", bench_factored(out_dim, in_dim, args.k, args.r))
        for decay in (0.5, 1.0):
            report("bench_lowrank", bench_randomized(out_dim, in_dim, args.rank, decay))


if __name__ == "__main__":
    main()
