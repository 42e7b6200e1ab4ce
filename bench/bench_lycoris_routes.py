"""LoHa/LoKr in the low-rank engine: factored through their exact factors, or dense (randomized SVD).

Two parts:

  --crossover   per-job time of both routes of the engine (library/lowrank_engine.run_jobs) for LoKr
                adapters with decomposed w1/w2 of exact rank R = r1·r2 on several weight shapes, cut to
                rank k. The fitted constants of library/exact_lowrank.factored_is_cheaper come from this.
  --real        the real LyCORIS LoKr file (data/real-loras/LyCORIS__smart_falcon_4_lokr.safetensors):
                resize_lora.py --new_rank 8 and svd_merge_lora.py of the file with itself (ratios 0.6 0.4)
                --new_rank 16, "before" (LoHa/LoKr forced onto the dense route, as until this change) and
                "after"; each run in a fresh process: wall time, peak RSS, output size, max relative error.

    python -m bench.bench_lycoris_routes [--crossover] [--real] [--scale 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench.common import ROOT, report, run_measured

REAL_LOKR = "/work/shared/data/real-loras/LyCORIS__smart_falcon_4_lokr.safetensors"

# (out, in) with LoKr splits (a1, b1) × (a2, b2): out = a1·a2, in = b1·b2
SHAPES = {(320, 2880): ((20, 60), (16, 48)), (640, 640): ((16, 16), (40, 40)),
          (1280, 1280): ((16, 16), (80, 80)), (3072, 3072): ((16, 16), (192, 192))}
RANKS = ((2, 8), (4, 16), (8, 16), (12, 16), (16, 16), (16, 32), (16, 48))  # (r1, r2)


def _lokr(split, r1: int, r2: int, seed: int):
    import torch

    from networks.lokr import LoKrAdapter

    (a1, b1), (a2, b2) = split
    g = torch.Generator().manual_seed(seed)
    t = {"lokr_w1_a": torch.randn(a1, r1, generator=g), "lokr_w1_b": torch.randn(r1, b1, generator=g),
         "lokr_w2_a": torch.randn(a2, r2, generator=g), "lokr_w2_b": torch.randn(r2, b2, generator=g)}
    return LoKrAdapter(t, float(r2), name="bench")


def _time_route(adapter, shape, k: int, factored: bool, repeats: int) -> float:
    from library.exact_lowrank import ExactFactors
    from library.lowrank_engine import EngineSettings, LowRankJob, run_jobs

    best = float("inf")
    for _ in range(repeats):
        if factored:
            job = LowRankJob("bench", shape, k, parts=[(ExactFactors(adapter), 1.0)])
        else:
            job = LowRankJob("bench", shape, k, dense=lambda: adapter.delta(shape).reshape(shape[0], -1))
        start = time.perf_counter()
        run_jobs([job], EngineSettings())
        best = min(best, time.perf_counter() - start)
    return best


def crossover(k: int, repeats: int, scale: float) -> None:
    from library.exact_lowrank import factored_is_cheaper

    rows = []
    for shape, split in SHAPES.items():
        if shape[0] * shape[1] > 2e6 * scale:
            continue
        for r1, r2 in RANKS:
            if r1 > min(split[0]) or r2 > min(split[1]):
                continue
            adapter = _lokr(split, r1, r2, 0)
            rank = r1 * r2
            if rank >= min(shape):
                continue
            fac = _time_route(adapter, shape, k, True, repeats)
            den = _time_route(adapter, shape, k, False, repeats)
            rule = factored_is_cheaper(rank, shape, k)
            rows.append({"shape": list(shape), "R": rank, "k": k, "factored_ms": round(fac * 1e3, 2),
                         "dense_ms": round(den * 1e3, 2), "faster": "factored" if fac < den else "dense",
                         "rule_says": "factored" if rule else "dense"})
            report("crossover", rows[-1])
    agree = sum(r["faster"] == r["rule_says"] for r in rows)
    print(f"rule agrees with the faster route on {agree}/{len(rows)} cases")


CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import library.exact_lowrank as ex
if {before}:
    ex.factored_is_cheaper = lambda *a, **k: False  # the route before exact factors: LoHa/LoKr always dense
from library.cli import parse_args
import {script} as script
args = parse_args(script.setup_parser(), {argv!r})
start = time.perf_counter()
out = script.main(args)
wall = time.perf_counter() - start
rows = json.load(open({report!r}))["layers"]
routes = sorted({{r["route"] for r in rows}})
peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps({{"compute_s": round(wall, 2), "peak_rss_mib": peak,
                  "output_bytes": os.path.getsize({save!r}), "routes": routes,
                  "max_relative_error": max(r["relative_error"] for r in rows)}}))
"""


def real(threads: int) -> None:
    if not os.path.exists(REAL_LOKR):
        print(f"skipped: {REAL_LOKR} is absent")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"resize_lora --new_rank 8": ("resize_lora", ["--model", REAL_LOKR, "--new_rank", "8"]),
                 "svd_merge_lora x2 --new_rank 16": ("svd_merge_lora", ["--models", REAL_LOKR, REAL_LOKR, "--ratios",
                                                                        "0.6", "0.4", "--new_rank", "16"])}
        for label, (script, argv) in cases.items():
            for before in (True, False):
                save, rep = os.path.join(tmp, "out.safetensors"), os.path.join(tmp, "r.json")
                full = [*argv, "--save_to", save, "--report", rep, "--overwrite"]
                code = CHILD.format(root=ROOT, threads=threads, before=before, script=script, argv=full, report=rep,
                                    save=save)
                figures = run_measured(code)
                figures.pop("children_max_rss_mib", None)
                report(f"real LoKr {label} {'before' if before else 'after'}", figures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crossover", action="store_true")
    p.add_argument("--real", action="store_true")
    p.add_argument("--k", type=int, default=16, help="target rank of the crossover jobs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="<1 drops the larger crossover shapes")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not (args.crossover or args.real):
        args.crossover = args.real = True
    if args.crossover:
        crossover(args.k, args.repeats, args.scale)
    if args.real:
        real(args.threads)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
