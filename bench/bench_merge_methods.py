"""Time of each svd_merge method on ten Flux-shaped LoRAs, extrapolated to a full-size Flux.1 LoRA.

Usage: python bench/bench_merge_methods.py [--loras 10] [--rank 16] [--per_shape 1] [--threads 2] [--scale 1.0]
           [--methods add tsv iso_c iso_cts knots np_lora della breadcrumbs] [--knots_method ties]
           [--dense_rows 1.0]
       (`--dense_rows 0.1`: della/breadcrumbs/floor on a tenth of each layer's rows, scaled back; then every method
       at full width takes about 2 minutes of an idle 2-core box, 5 at load average 12; `--scale 0.25` is a smoke run)

The LoRAs are random rank-`--rank` factors (singular values decaying as in bench/fixtures) on the 304 Linears
sd-scripts' lora_flux trains (19 double blocks × {qkv, proj, mlp.0, mlp.2, mod} × 2 streams, 38 single blocks
× {linear1, linear2, modulation}: 7 distinct shapes). `--per_shape` layers of each distinct shape are merged
with each method (svd_merge.merge_layers, truncated to `--rank`, fp32) in one process with `--threads` torch
threads; the full-model figure is Σ over shapes of (mean time of that shape × number of Flux layers of that
shape). `--scale` < 1 divides every width (a quick smoke run; its figures do not extrapolate). np_lora takes
the first two LoRAs (subject, style); the others take all `--loras`. Loading and writing the files are not
included (they are the same for every method; see bench_svd_merge.py). Target: < 60 s per method.

Each line gives the wall time (`full_flux_s`) and the process CPU time (`full_flux_cpu_s`: on a shared box the
wall time grows with the load, the CPU time much less; the load average is printed first). della and
breadcrumbs rank the entries of each input's dense delta (no factored form exists for an entry-wise rank), so
the `floor` line is the time just to form the ten dense deltas ΔWᵢ = BᵢAᵢ of every layer, extrapolated the same
way: no entry-wise method can be faster than it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import report  # noqa: E402
from bench.fixtures import flux_modules  # noqa: E402
from networks.lora import LoRAAdapter  # noqa: E402

METHODS = ("add", "tsv", "iso_c", "iso_cts", "knots", "np_lora", "della", "breadcrumbs")


def adapters(shape, n_loras, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    weights = torch.arange(1, rank + 1, dtype=torch.float32).pow(-0.5)
    for _ in range(n_loras):
        down = torch.randn(rank, shape[1], generator=gen) / math.sqrt(shape[1])
        up = torch.randn(shape[0], rank, generator=gen) * 0.05 * weights
        out.append(LoRAAdapter(down, up, alpha=float(rank)))
    return out


def form_deltas(loras, rows: int = 256) -> None:
    """The ten dense deltas of one layer, `rows` rows at a time into one reused buffer (no page faults of fresh
    m×n allocations, which cost a VM as much as the product): the floor of any method that reads every entry."""
    factors = [adapter.factors() for adapter in loras]
    buffer = torch.empty(rows, factors[0][1].shape[1])
    for up, down in factors:
        for start in range(0, up.shape[0], rows):
            part = up[start:start + rows]
            torch.matmul(part, down, out=buffer[:part.shape[0]])


def extrapolate(label: str, runs: dict, counts: Counter, n_inputs: int, factor: dict | None = None) -> dict:
    """Mean wall and CPU time per layer of each shape (runs[shape]: callables, one per measured layer; × factor[shape]
    when they ran on a share of the rows), and Σ over shapes of (mean × number of Flux layers of that shape)."""
    factor = factor or {}
    wall, cpu = {}, {}
    for s, calls in runs.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        for call in calls:
            call()
        wall[s] = (time.perf_counter() - start) / len(calls) * factor.get(s, 1.0)
        cpu[s] = (time.process_time() - start_cpu) / len(calls) * factor.get(s, 1.0)
    figures = {"inputs": n_inputs, "full_flux_s": round(sum(wall[s] * counts[s] for s in counts), 1),
               "full_flux_cpu_s": round(sum(cpu[s] * counts[s] for s in counts), 1),
               "per_layer_ms": {f"{s[0]}x{s[1]}": round(1000 * t, 1) for s, t in wall.items()},
               "per_layer_cpu_ms": {f"{s[0]}x{s[1]}": round(1000 * t, 1) for s, t in cpu.items()}}
    report(label, figures)
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--per_shape", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="divide every width by 1/scale (smoke runs)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--knots_method", default="ties")
    parser.add_argument("--dense_rows", type=float, default=1.0,
                        help="della, breadcrumbs and the floor on this share of each layer's output rows, times "
                             "1/share (their work is linear in the rows: per-row ranks, per-entry selection); "
                             "0.1 makes the whole run about 2 minutes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from library.methods import SingularParams
    from library.svd_merge import LayerJob, MergeSettings, merge_layers

    counts = Counter(m.shape for m in flux_modules())
    shapes = {s: tuple(max(8, int(d * args.scale)) for d in s) for s in counts}
    layers = {s: [adapters(shapes[s], args.loras, args.rank, seed=100 * i + j) for j in range(args.per_shape)]
              for i, s in enumerate(counts)}
    # the entry-wise runs: the first rows of the same LoRAs (LoRAAdapter(down, up[:rows], alpha))
    rows = {s: max(8, math.ceil(shapes[s][0] * args.dense_rows)) for s in counts}
    dense_layers = {s: [[LoRAAdapter(a.down, a.up[:rows[s]], alpha=float(a.alpha)) for a in loras] for loras in sets]
                    for s, sets in layers.items()}
    dense_shapes = {s: (rows[s], shapes[s][1]) for s in counts}
    dense_factor = {s: shapes[s][0] / rows[s] for s in counts}
    report("load", {"uptime_load_average": [round(x, 2) for x in os.getloadavg()], "threads": args.threads,
                    "shapes": {f"{s[0]}x{s[1]}": counts[s] for s in counts}})
    floor = {s: [partial(form_deltas, loras) for loras in sets] for s, sets in dense_layers.items()}
    results = {"floor": extrapolate("floor", floor, counts, args.loras, dense_factor)}
    for method in args.methods:
        n = 2 if method == "np_lora" else args.loras
        # the README's parameters: density 0.5 for knots' TIES and della, breadcrumbs 0.9 + gamma 0.01
        settings = MergeSettings(mode=method, new_rank=args.rank, density=0.9 if method == "breadcrumbs" else 0.5,
                                 singular=SingularParams(knots_method=args.knots_method))
        dense = method in ("della", "breadcrumbs")
        sizes, inputs = (dense_shapes, dense_layers) if dense else (shapes, layers)
        runs = {s: [partial(merge_layers, [LayerJob(f"{s}#{j}", sizes[s], [(i, a, 1.0) for i, a in enumerate(loras[:n])])],
                            settings) for j, loras in enumerate(sets)] for s, sets in inputs.items()}
        results[method] = extrapolate(method, runs, counts, n, dense_factor if dense else None)
    return results


if __name__ == "__main__":
    main()
