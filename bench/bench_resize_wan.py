"""Resize a Wan 2.1 / 2.2-A14B-shaped rank-512 LoRA to rank 64 with resize_lora.py: time, peak RSS and routes.

Wan LoRAs of rank 256/512 are common (issue 16); at 5120 wide with a 13824 FFN, a dense ΔW per layer is
5120×13824 fp32 = 270 MiB and its SVD takes minutes on a CPU, so resize must stay on the factored route
(QR of the factors, SVD of a 512×512 core). The file has diffusers' Wan names and shapes
(reference/shapes/wan21_14b.tsv: attn1/attn2 q, k, v, out and ffn.net.0/2 of each block) for the first
`--blocks` blocks of 40; time and file size scale with the blocks, the per-layer peak does not. The bench
asserts that every layer's report route is "factored" (no m×n tensor formed) and prints the figures, with the
time extrapolated to the 40 blocks.

    python -m bench.bench_resize_wan [--blocks 2] [--rank 512] [--new_rank 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import torch

from bench.common import PEAK_RSS_SNIPPET, report, run_measured
from library.lowrank_engine import FACTORED
from library.safetensors_io import save_tensors

SHAPES = "/work/shared/reference/shapes" if os.path.isdir("/work/shared/reference/shapes") else \
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "shapes")
BLOCKS_14B = 40

CHILD = PEAK_RSS_SNIPPET + """
import sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
import resize_lora
from library.cli import parse_args
args = parse_args(resize_lora.setup_parser(), ["--model", sys.argv[1], "--save_to", sys.argv[2], "--new_rank",
                                               sys.argv[3], "--save_precision", "bf16"])
start = time.perf_counter()
out = resize_lora.main(args)
seconds = time.perf_counter() - start
routes = out["summary"]["routes"]
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": peak_mib(), "routes": routes,
                  "layers": out["summary"]["layers"]}))
"""


def block_modules(blocks: int) -> list[tuple[str, tuple[int, int]]]:
    rows = []
    with open(os.path.join(SHAPES, "wan21_14b.tsv")) as f:
        for line in f:
            path, kind, shape, _bias = line.rstrip("\n").split("\t")
            parts = path.split(".")
            if kind == "Linear" and parts[0] == "blocks" and int(parts[1]) < blocks:
                rows.append((path, tuple(int(x) for x in shape.split("x"))))
    return rows


def make_lora(path: str, blocks: int, rank: int, seed: int = 0) -> dict:
    """diffusers/PEFT keys (`transformer.blocks.N.attn1.to_q.lora_A.weight`), bf16, columns of decaying scale so
    the spectrum decays as a trained LoRA's; alpha = rank in the PEFT metadata (none given: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, rank)
    tensors = {}
    for name, (out, inp) in block_modules(blocks):
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) / inp ** 0.5).bfloat16()
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * decay * 0.05).bfloat16()
    save_tensors(path, tensors)
    return {"modules": len(tensors) // 2, "file_mib": round(os.path.getsize(path) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2, help="blocks of 40 in the file (default 2)")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--new_rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the resize (default 1)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench_resize_wan_")
    try:
        src, dst = os.path.join(folder, "wan_r512.safetensors"), os.path.join(folder, "wan_r64.safetensors")
        made = make_lora(src, args.blocks, args.rank)
        ours = run_measured(CHILD, src, dst, str(args.new_rank), str(args.threads))
        dense_mib = 13824 * 5120 * 4 / 2**20
        if set(ours["routes"]) != {FACTORED}:
            raise SystemExit(f"a layer left the factored route: {json.dumps(ours['routes'])}")
        report("wan14b-r512-to-r64", {
            **made, "blocks": args.blocks, "rank": args.rank, "new_rank": args.new_rank, "threads": args.threads,
            "seconds": ours["seconds"], "peak_rss_mib": ours["peak_rss_mib"], "routes": ours["routes"],
            "out_mib": round(os.path.getsize(dst) / 2**20, 1),
            "seconds_40_blocks_est": round(ours["seconds"] * BLOCKS_14B / args.blocks, 1),
            "dense_ffn_delta_mib_avoided": round(dense_mib, 1)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
