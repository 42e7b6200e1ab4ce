"""Extraction from two SDXL-shaped checkpoints: streaming randomized SVD vs loading both whole + full SVD.

Usage: python bench/bench_extract.py [--blocks input_blocks.4. input_blocks.5. ...] [--rank 32] [--folder /tmp]
       python bench/bench_extract.py --full_unet      # whole SDXL UNet pair (10 GB of fp16), ours only

The fixture pair has real SDXL UNet LDM key names (`model.diffusion_model.…`) and full shapes, from
`reference/shapes/sdxl_unet_kohya_sgm.tsv` (every kohya target: 722 attention Linears + 66 ResNet
convs/Linears) with their biases. Base weights are random fp16; tuned = base + a rank-96 delta with a
slowly decaying spectrum (σᵢ ∝ i^-0.5, like a fine-tune's) + small dense noise. A subset of blocks keeps
the full-SVD baseline within minutes on 2 cores; the selection is printed with the figures.

Both sides run in fresh processes (peak RSS of each is its own):
- ours: `extract_lora_from_models.py --dim R --conv_dim R` (randomized SVD, p = R, 2 power iterations);
- baseline: load both files whole (safetensors load_file), compute every difference (as sd-scripts keeps
  them in a dict), then `torch.linalg.svd(full_matrices=False)` per layer truncated to R — the exact
  optimum, and already faster than sd-scripts' `full_matrices=True`.
Relative error per layer is ‖ΔW − LoRA‖_F / ‖ΔW‖_F; we report ours / exact (target ≤ 1.01).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import PEAK_RSS_SNIPPET, report, run_measured  # noqa: E402
from library.safetensors_io import StreamingWriter  # noqa: E402

SHAPES = os.path.join(ROOT, "..", "shared", "reference", "shapes", "sdxl_unet_kohya_sgm.tsv")
PREFIX = "model.diffusion_model."
# Words of SGM module names that contain an underscore themselves; every other "_" was a ".".
COMPOUNDS = ("input_blocks", "middle_block", "output_blocks", "transformer_blocks", "in_layers", "out_layers",
             "emb_layers", "skip_connection", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out")
DEFAULT_BLOCKS = ("input_blocks.4.", "input_blocks.5.", "middle_block.1.transformer_blocks.0.", "output_blocks.0.0.")


def ldm_path(kohya_name: str) -> str:
    """`lora_unet_input_blocks_4_1_proj_in` → `input_blocks.4.1.proj_in` (SGM names flatten without ambiguity
    once the compound words above are known)."""
    rest = kohya_name[len("lora_unet_"):]
    for word in COMPOUNDS:
        rest = rest.replace(word, word.replace("_", "\0"))
    return rest.replace("_", ".").replace("\0", "_")


def sdxl_modules(blocks: tuple[str, ...] | None) -> list[tuple[str, tuple[int, ...], bool]]:
    """(LDM key without `.weight`, shape, has_bias) of the chosen SDXL UNet kohya targets."""
    out = []
    with open(SHAPES, encoding="utf-8") as f:
        next(f)
        for line in f:
            kohya, _diffusers, _kind, shape, bias = line.rstrip("\n").split("\t")
            path = ldm_path(kohya)
            if blocks and not path.startswith(blocks):
                continue
            out.append((PREFIX + path, tuple(int(d) for d in shape.split("x")), bias == "True"))
    return out


def write_pair(folder: str, modules, *, delta_rank: int = 96, seed: int = 0) -> tuple[str, str]:
    """Base (random fp16) and tuned (= base + decaying-spectrum low-rank delta + noise) checkpoints."""
    specs = {}
    for key, shape, bias in modules:
        specs[key + ".weight"] = (torch.float16, shape)
        if bias:
            specs[key + ".bias"] = (torch.float16, (shape[0],))
    base_path, tuned_path = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(base_path, specs, overwrite=True) as wb, StreamingWriter(tuned_path, specs, overwrite=True) as wt:
        for key, shape, bias in modules:
            rows, cols = shape[0], math.prod(shape[1:])
            base = torch.randn(rows, cols, generator=gen) * (1.0 / math.sqrt(cols))
            k = min(delta_rank, rows, cols)
            u = torch.linalg.qr(torch.randn(rows, k, generator=gen))[0]
            v = torch.linalg.qr(torch.randn(cols, k, generator=gen))[0]
            sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
            delta = (u * sigma) @ v.T
            delta *= 0.05 * base.norm() / delta.norm()
            noise = torch.randn(rows, cols, generator=gen) * (0.002 * float(delta.norm()) / math.sqrt(rows * cols))
            wb.write(key + ".weight", base.reshape(shape).half())
            wt.write(key + ".weight", (base + delta + noise).reshape(shape).half())
            if bias:
                b = torch.randn(rows, generator=gen) * 0.01
                wb.write(key + ".bias", b.half())
                wt.write(key + ".bias", (b + 0.001).half())
    return base_path, tuned_path


OURS = PEAK_RSS_SNIPPET + r"""
import sys, time
import extract_lora_from_models as x
base, tuned, out, rank, rep = sys.argv[1:6]
args = x.setup_parser().parse_args(["--model_org", base, "--model_tuned", tuned, "--save_to", out, "--dim", rank,
    "--conv_dim", rank, "--device", "cpu", "--overwrite", "--report", rep, "--format", "comfy",
    "--prefix_model", "model.diffusion_model.", "--prefix_lora", "diffusion_model."])
start = time.perf_counter()
x.main(args)
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""

BASELINE = PEAK_RSS_SNIPPET + r"""
import sys, time, torch
from safetensors.torch import load_file
base_path, tuned_path, rank, rep = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
base, tuned = load_file(base_path), load_file(tuned_path)
diffs = {k: tuned[k].float() - base[k].float() for k in base if k.endswith(".weight")}
errors = {}
for k, d in diffs.items():
    m = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, *m.shape)
    err = (m - (u[:, :r] * s[:r]) @ vh[:r]).norm() / m.norm()
    errors[k] = float(err)
seconds = time.perf_counter() - start
json.dump(errors, open(rep, "w"))
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": peak_mib()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="*", default=list(DEFAULT_BLOCKS),
                        help="LDM path prefixes (after model.diffusion_model.) of the blocks to include")
    parser.add_argument("--full_unet", action="store_true", help="every SDXL UNet target, ours only (no baseline)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    blocks = None if args.full_unet else tuple(args.blocks)
    modules = sdxl_modules(blocks)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        base, tuned = write_pair(folder, modules)
        size_gib = (os.path.getsize(base) + os.path.getsize(tuned)) / 2**30
        ours_report = os.path.join(folder, "ours.json")
        ours = run_measured(OURS, base, tuned, os.path.join(folder, "lora.safetensors"), str(args.rank), ours_report)
        with open(ours_report) as f:
            layers = {e["key"]: e for e in json.load(f)["layers"] if e.get("role") == "lowrank" and "skipped" not in e}
        figures = {"modules": len(modules), "blocks": "all UNet targets" if blocks is None else list(blocks),
                   "pair_gib": round(size_gib, 2), "rank": args.rank, "ours_s": ours["seconds"],
                   "ours_peak_rss_mib": ours["peak_rss_mib"]}
        if blocks is not None:
            base_report = os.path.join(folder, "baseline.json")
            full = run_measured(BASELINE, base, tuned, str(args.rank), base_report)
            with open(base_report) as f:
                exact = json.load(f)
            ratios = [layers[k]["relative_error"] / exact[k] for k in exact if exact[k] > 0]
            figures.update({
                "baseline_s": full["seconds"], "baseline_peak_rss_mib": full["peak_rss_mib"],
                "speedup": round(full["seconds"] / ours["seconds"], 2),
                "memory_ratio": round(ours["peak_rss_mib"] / full["peak_rss_mib"], 3),
                "error_ratio_max": round(max(ratios), 5), "error_ratio_mean": round(sum(ratios) / len(ratios), 5),
                "exact_relative_error_mean": round(sum(exact.values()) / len(exact), 5),
            })
    report("extract sdxl", figures)


if __name__ == "__main__":
    main()
