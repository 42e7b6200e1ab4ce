"""Time of each svd_merge method on ten Flux-shaped LoRAs, extrapolated to a full-size Flux.1 LoRA.

Usage: python bench/bench_merge_methods.py [--loras 10] [--rank 16] [--per_shape 1] [--threads 2]
                                           [--scale 1.0] [--methods add tsv iso_c iso_cts knots np_lora]

The LoRAs are random rank-`--rank` factors (singular values decaying as in bench/fixtures) on the 304 Linears
sd-scripts' lora_flux trains (19 double blocks × {qkv, proj, mlp.0, mlp.2, mod} × 2 streams, 38 single blocks
× {linear1, linear2, modulation}: 7 distinct shapes). `--per_shape` layers of each distinct shape are merged
with each method (svd_merge.merge_layers, truncated to `--rank`, fp32) in one process with `--threads` torch
threads; the full-model figure is Σ over shapes of (mean time of that shape × number of Flux layers of that
shape). `--scale` < 1 divides every width (a quick smoke run; its figures do not extrapolate). np_lora takes
the first two LoRAs (subject, style); the others take all `--loras`. Loading and writing the files are not
included (they are the same for every method; see bench_svd_merge.py). Target: < 60 s per method.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import report  # noqa: E402
from bench.fixtures import flux_modules  # noqa: E402

METHODS = ("add", "tsv", "iso_c", "iso_cts", "knots", "np_lora")


def adapters(shape, n_loras, rank, seed):
    from networks.lora import LoRAAdapter

    gen = torch.Generator().manual_seed(seed)
    out = []
    weights = torch.arange(1, rank + 1, dtype=torch.float32).pow(-0.5)
    for _ in range(n_loras):
        down = torch.randn(rank, shape[1], generator=gen) / math.sqrt(shape[1])
        up = torch.randn(shape[0], rank, generator=gen) * 0.05 * weights
        out.append(LoRAAdapter(down, up, alpha=float(rank)))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--per_shape", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="divide every width by 1/scale (smoke runs)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--knots_method", default="ties")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from library.methods import SingularParams
    from library.svd_merge import LayerJob, MergeSettings, merge_layers

    counts = Counter(m.shape for m in flux_modules())
    shapes = {s: tuple(max(8, int(d * args.scale)) for d in s) for s in counts}
    layers = {s: [adapters(shapes[s], args.loras, args.rank, seed=100 * i + j) for j in range(args.per_shape)]
              for i, s in enumerate(counts)}
    results = {}
    for method in args.methods:
        n = 2 if method == "np_lora" else args.loras
        settings = MergeSettings(mode=method, new_rank=args.rank, density=0.5,
                                 singular=SingularParams(knots_method=args.knots_method))
        per_shape = {}
        for s, sets in layers.items():
            jobs = [LayerJob(f"{s}#{j}", shapes[s], [(i, a, 1.0) for i, a in enumerate(loras[:n])])
                    for j, loras in enumerate(sets)]
            start = time.perf_counter()
            merge_layers(jobs, settings)
            per_shape[s] = (time.perf_counter() - start) / len(jobs)
        full = sum(per_shape[s] * counts[s] for s in counts)
        results[method] = {"inputs": n, "full_flux_s": round(full, 1),
                           "per_layer_ms": {f"{s[0]}x{s[1]}": round(1000 * t, 1) for s, t in per_shape.items()}}
        report(method, results[method])
    return results


if __name__ == "__main__":
    main()
