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

Against sd-scripts itself, on a full SD2 pair (bench/sd2_checkpoint.py: 2 × 2.4 GiB fp16, real LDM keys,
rank-4 deltas on every LoRA target, `--dim 8 --v2`; needs ~6 GB of disk under --folder and ~13 GB of RAM
for sd-scripts, which loads both models in float32):

    python bench/bench_extract.py --sd2 --sd_scripts /tmp/sd-scripts --sd_scripts_path /tmp/sdenv --repeat 2

runs ours and sd-scripts' networks/extract_lora_from_models.py back to back (`--repeat` times, the load
average printed with each), each in a fresh process (wall time, VmHWM peak), then the load-whole + full-SVD
baseline, which also measures every module's error in both outputs against the exact truncation.
`--sd2 --quick` (no sd-scripts: it needs the whole checkpoint) keeps UNet input block 4 and text-encoder
layer 0. sd-scripts runs with cwd = its checkout (its `library` package is not ours). Its pinned packages
(requirements.txt of v0.10.1: transformers 4.54.1, tokenizers 0.21, huggingface_hub 0.34, diffusers 0.32.1,
accelerate 1.6.0, imagesize 1.4.1, which its save path imports through train_util; transformers 5 renamed
CLIPTextModel's keys, which its --v2 loader then fails to load) go in a folder of their own,
`pip install --target /tmp/sdenv --no-deps ...`, given as --sd_scripts_path.
Its library/utils.py imports torchvision and cv2 for image code the extraction never runs; where they
cannot be imported (PyPI has no torchvision for a +cpu torch) the runner puts empty stand-in modules in
sys.modules after diffusers and transformers are imported, so their own availability checks see neither
(every attribute of a stand-in is a callable doing nothing: train_util builds `transforms.Compose(...)` on import).
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
from bench.common import PEAK_HWM_SNIPPET, PEAK_RSS_SNIPPET, report, run_measured  # noqa: E402
from bench.sd2_checkpoint import TE, UNET, sd2_specs, write_sd2_pair  # noqa: E402
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


SD2_OURS = PEAK_HWM_SNIPPET + r"""
import sys, time
import extract_lora_from_models as x
from library.cli import parse_args
start = time.perf_counter()
x.main(parse_args(x.setup_parser(), sys.argv[1:]))
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""

SD_SCRIPTS = PEAK_HWM_SNIPPET + r"""
import os, runpy, sys, time, types
sd_dir, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
import diffusers, transformers  # their availability checks run before any stand-in below exists
from transformers import CLIPTextModel, CLIPTokenizer, CLIPTextConfig
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, EulerAncestralDiscreteScheduler
for name in ("torchvision", "cv2"):
    try:
        __import__(name)
    except Exception:  # missing, or a torchvision built for another torch
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
        def stand_in(qualname):  # every attribute (Compose, INTER_AREA, ...) is a callable doing nothing
            mod = types.ModuleType(qualname)
            mod.__getattr__ = lambda attr: (lambda *a, **k: None)
            return mod
        mod = stand_in(name)
        mod.transforms = sys.modules[name + ".transforms"] = stand_in(name + ".transforms")
        sys.modules[name] = mod
script = os.path.join(sd_dir, "networks", "extract_lora_from_models.py")
sys.path[:0] = [sd_dir, os.path.dirname(script)]
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""

# The load-whole + full-SVD baseline on the modules ours extracted (timed), then the error of every module of
# each LoRA file given against the exact truncation (untimed).
SD2_BASELINE = PEAK_HWM_SNIPPET + r"""
import sys, time, torch
from safetensors.torch import load_file
base_path, tuned_path, modules_path, out_path, *loras = sys.argv[1:]
modules = json.load(open(modules_path))  # module -> [key, rows or None, rank]
start = time.perf_counter()
base, tuned = load_file(base_path), load_file(tuned_path)
diffs, exact = {}, {}
for name, (key, rows, rank) in modules.items():
    d = tuned[key].float() - base[key].float()
    d = (d if rows is None else d[rows[0]:rows[1]]).reshape(d.shape[0] if rows is None else rows[1] - rows[0], -1)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    exact[name] = float(s[rank:].double().square().sum().sqrt() / d.double().norm())
    diffs[name] = d
seconds = time.perf_counter() - start
peak = peak_mib()
del base, tuned
out = {"seconds": round(seconds, 2), "peak_rss_mib": peak, "exact": exact, "loras": {}}
for path in loras:
    lora, errors = load_file(path), {}
    for name, d in diffs.items():
        if name + ".lora_up.weight" not in lora:
            continue
        up, down = lora[name + ".lora_up.weight"].double(), lora[name + ".lora_down.weight"].double()
        r = down.shape[0]
        scale = float(lora[name + ".alpha"]) / r if name + ".alpha" in lora else 1.0
        approx = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * scale
        errors[name] = float((d.double() - approx).norm() / d.double().norm())
    out["loras"][path] = errors
json.dump(out, open(out_path, "w"))
print(json.dumps({"seconds": out["seconds"], "peak_rss_mib": peak}))
"""


def sd2_quick_keys() -> set[str]:
    """UNet input block 4 and text-encoder layer 0: a 0.1 GB pair to check the set-up (ours + baseline only)."""
    return {k for k in sd2_specs() if k.startswith((UNET + "input_blocks.4.", TE + "transformer.resblocks.0."))}


def error_ratios(errors: dict[str, float], exact: dict[str, float]) -> dict:
    ratios = [errors[k] / exact[k] for k in exact if k in errors and exact[k] > 0]
    return {"modules": len(ratios), "error_ratio_max": round(max(ratios), 5),
            "error_ratio_mean": round(sum(ratios) / len(ratios), 5)} if ratios else {"modules": 0}


def run_sd2(args: argparse.Namespace) -> None:
    env = dict(os.environ)
    if args.sd_scripts_path:
        env["PYTHONPATH"] = os.pathsep.join([args.sd_scripts_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        base, tuned = os.path.join(folder, "base.safetensors"), os.path.join(folder, "tuned.safetensors")
        write_sd2_pair(base, tuned, keys=sd2_quick_keys() if args.quick else None)
        ours_out, sd_out = os.path.join(folder, "ours.safetensors"), os.path.join(folder, "sd_scripts.safetensors")
        ours_report = os.path.join(folder, "ours.json")
        figures = {"pair_gib": round((os.path.getsize(base) + os.path.getsize(tuned)) / 2**30, 2), "dim": args.rank,
                   "runs": []}
        for _ in range(args.repeat):
            run = {"load_before": os.getloadavg()[0]}
            ours = run_measured(SD2_OURS, "--model_org", base, "--model_tuned", tuned, "--save_to", ours_out,
                                "--dim", str(args.rank), "--v2", "--overwrite", "--report", ours_report,
                                *(["--family", "sd2"] if args.quick else []))  # a part of SD2 is no known family
            run.update({"ours_wall_s": ours["wall_s"], "ours_s": ours["seconds"], "ours_peak_mib": ours["peak_rss_mib"]})
            if args.sd_scripts:
                run["load_between"] = os.getloadavg()[0]
                sd = run_measured(SD_SCRIPTS, args.sd_scripts, "--model_org", base, "--model_tuned", tuned,
                                  "--save_to", sd_out, "--dim", str(args.rank), "--v2",
                                  cwd=args.sd_scripts, env=env)
                run.update({"sd_scripts_wall_s": sd["wall_s"], "sd_scripts_peak_mib": sd["peak_rss_mib"],
                            "speedup_wall": round(sd["wall_s"] / ours["wall_s"], 2)})
            run["load_after"] = os.getloadavg()[0]
            figures["runs"].append(run)
            print("run:", json.dumps(run), flush=True)
        with open(ours_report) as f:
            modules = {e["module"]: [e["key"], e.get("rows"), e["rank_out"]] for e in json.load(f)["layers"]
                       if e.get("role") == "lowrank" and "skipped" not in e}
        modules_path, evaluation = os.path.join(folder, "modules.json"), os.path.join(folder, "evaluation.json")
        with open(modules_path, "w") as f:
            json.dump(modules, f)
        loras = [ours_out] + ([sd_out] if args.sd_scripts else [])
        full = run_measured(SD2_BASELINE, base, tuned, modules_path, evaluation, *loras)
        with open(evaluation) as f:
            result = json.load(f)
        figures.update({"baseline_s": full["seconds"], "baseline_peak_mib": full["peak_rss_mib"],
                        "ours": error_ratios(result["loras"][ours_out], result["exact"])})
        if args.sd_scripts:
            figures["sd_scripts"] = error_ratios(result["loras"][sd_out], result["exact"])
        figures["speedup_vs_baseline"] = round(full["seconds"] / figures["runs"][-1]["ours_s"], 2)
    report("extract sd2", figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="*", default=list(DEFAULT_BLOCKS),
                        help="LDM path prefixes (after model.diffusion_model.) of the blocks to include")
    parser.add_argument("--full_unet", action="store_true", help="every SDXL UNet target, ours only (no baseline)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    parser.add_argument("--sd2", action="store_true", help="the full SD2 pair, --dim --rank, against --sd_scripts")
    parser.add_argument("--sd_scripts", default=None, help="an sd-scripts checkout (v0.10.1) to run side by side (--sd2)")
    parser.add_argument("--sd_scripts_path", default=None, help="folder of sd-scripts' pinned packages (PYTHONPATH)")
    parser.add_argument("--repeat", type=int, default=1, help="back-to-back runs of ours and sd-scripts (--sd2)")
    parser.add_argument("--quick", action="store_true", help="--sd2 on UNet input block 4 + TE layer 0 (no sd-scripts)")
    args = parser.parse_args()
    if args.sd2 or args.sd_scripts:
        if args.sd_scripts and args.quick:
            parser.error("--quick cannot run sd-scripts: its loader needs the whole checkpoint")
        if "--rank" not in sys.argv:
            args.rank = 8
        return run_sd2(args)
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
