"""Resize benchmark: our factored route (library/resize.py) against a dense-SVD resize of the same layers.

Cases (real kohya module names and full shapes from reference/shapes/):
  sdxl-fixed   SDXL UNet LoRA/LoCon, rank 128 → 32
  sdxl-svfro   the same file, --dynamic_method sv_fro --dynamic_param 0.9 (cap 128)
  flux-fixed   Flux.1 LoRA on the 304 kohya default targets, rank 64 → 16
Factors are random with a decaying column scale so the spectra decay like trained LoRAs'.

"dense" is what sd-scripts does per layer: W = scale·up@down in float32, thin torch.linalg.svd (already
kinder than its full_matrices=True), the same rank rule on its spectrum. A dense SVD of a Flux 21504×3072
layer takes minutes on a 2-core CPU, so the dense side runs on `--dense_samples` layers of every distinct
(shape, rank) and its total is that per-layer time × the number of layers of the shape (stated in the
output). Ours runs on every layer. On the sampled layers the chosen ranks must be identical and the kept
singular values (recomputed from the factors we output) equal to the dense ones within 1e-4·σ₀.

    python -m bench.bench_resize [--cases sdxl-fixed,sdxl-svfro,flux-fixed] [--dense_samples 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict

import torch

from bench.common import report
from library.lowrank import factored_svd, rank_cap, select_rank
from library.resize import ResizeJob, ResizeSettings, resize_layers
from networks import adapter_from_tensors

SHAPES = "/work/shared/reference/shapes" if os.path.isdir("/work/shared/reference/shapes") else \
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "shapes")


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("x"))


def sdxl_modules() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    with open(os.path.join(SHAPES, "sdxl_unet_kohya_sgm.tsv")) as f:
        next(f)
        for line in f:
            name, _path, _type, shape, _bias = line.rstrip("\n").split("\t")
            rows.append((name, parse_shape(shape)))
    return rows


def flux_modules() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    with open(os.path.join(SHAPES, "flux1_bfl_kohya.tsv")) as f:
        next(f)
        for line in f:
            _path, name, shape, default = line.rstrip("\n").split("\t")
            if default == "True":
                rows.append((name, parse_shape(shape)))
    return rows


def make_jobs(modules, rank: int, alpha: float, seed: int = 0) -> list[ResizeJob]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.8  # trained LoRAs: decaying spectra
    jobs = []
    for name, shape in modules:
        r = min(rank, shape[0], math.prod(shape[1:]))
        down = torch.randn(r, *shape[1:], generator=g) * 0.02
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.02
        up *= decay[:r].reshape(1, r, *([1, 1] if len(shape) == 4 else []))
        tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}
        jobs.append(ResizeJob(name, shape, adapter_from_tensors(tensors, name)))
    return jobs


def dense_resize(job: ResizeJob, settings: ResizeSettings) -> tuple[int, torch.Tensor]:
    """sd-scripts' route: dense product, thin SVD, same rank rule; returns (rank, kept singular values)."""
    up, down = job.adapter.factors()
    matrix = up @ down
    S = torch.linalg.svd(matrix, full_matrices=False).S
    k = select_rank(S, settings.dynamic_method, settings.dynamic_param, max_rank=rank_cap(job.shape, settings),
                    input_rank=job.adapter.rank)
    return k, S[:k]


def ours_kept_values(tensors: dict, shape) -> torch.Tensor:
    """Singular values of what we wrote: (alpha/k)·up@down, from its factors (exact)."""
    up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
    k = down.shape[0]
    scale = float(tensors["alpha"]) / k
    return factored_svd(up.reshape(shape[0], k) * scale, down.reshape(k, -1)).S


def run_case(name: str, modules, rank: int, alpha: float, settings: ResizeSettings, samples: int) -> dict:
    jobs = make_jobs(modules, rank, alpha)
    start = time.perf_counter()
    results = resize_layers(jobs, settings)
    ours_s = time.perf_counter() - start

    groups: dict[tuple, list[ResizeJob]] = defaultdict(list)
    for job in jobs:
        groups[(job.shape, job.adapter.rank)].append(job)
    dense_total, worst_sv, rank_mismatch, sampled = 0.0, 0.0, 0, 0
    for (_shape, _r), members in groups.items():
        times = []
        for job in members[:samples]:
            t0 = time.perf_counter()
            k_dense, s_dense = dense_resize(job, settings)
            times.append(time.perf_counter() - t0)
            res = results[job.name]
            sampled += 1
            if res.report["rank_out"] != k_dense:
                rank_mismatch += 1
                continue
            s_ours = ours_kept_values(res.tensors, job.shape)
            worst_sv = max(worst_sv, float((s_ours.double() - s_dense.double()).abs().max() / s_dense[0].double()))
        dense_total += sum(times) / len(times) * len(members)
    ranks = [results[j.name].report["rank_out"] for j in jobs]
    return {"case": name, "layers": len(jobs), "ours_s": round(ours_s, 2), "dense_s_estimated": round(dense_total, 1),
            "speedup": round(dense_total / ours_s, 1), "dense_layers_timed": sampled,
            "rank_mismatches": rank_mismatch, "max_sv_diff_rel_to_s0": float(f"{worst_sv:.2e}"),
            "new_ranks_min_mean_max": [min(ranks), round(sum(ranks) / len(ranks), 1), max(ranks)],
            "threads": torch.get_num_threads()}


CASES = {
    "sdxl-fixed": (sdxl_modules, 128, 64.0, dict(new_rank=32)),
    "sdxl-svfro": (sdxl_modules, 128, 64.0, dict(new_rank=128, dynamic_method="sv_fro", dynamic_param=0.9)),
    "flux-fixed": (flux_modules, 64, 32.0, dict(new_rank=16)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dense_samples", type=int, default=1, help="dense SVDs timed per distinct layer shape")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: with 2 OpenMP threads on a loaded 2-core VM the "
                             "batched QRs stall, which made ours 2.4x slower and the ratios of the cases incomparable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        modules_fn, rank, alpha, settings = CASES[case]
        report("bench_resize", run_case(case, modules_fn(), rank, alpha, ResizeSettings(**settings), args.dense_samples))


if __name__ == "__main__":
    main()
