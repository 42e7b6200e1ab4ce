"""SVD-merge of two LoRAs: our factored route vs the dense SVD every other tool does, on real key names/shapes.

Usage: python bench/bench_svd_merge.py [--case sdxl|flux|both] [--rank 32] [--per_shape 2] [--folder /tmp]

Cases (fixtures from bench/fixtures.py, fp16 files like trained LoRAs):
- sdxl: two SDXL LoRAs, UNet attention (722 Linears) + CLIP-L (72) + CLIP-G (192), rank 32 each,
  merged with `add` (ratios 1, 0.7) to rank 32.
- flux: two Flux.1 LoRAs at full widths (3072; qkv 9216; linear1 21504; mod 18432), double blocks 0–1 and
  single blocks 0–1, rank 32 each, merged to rank 32.

Three measurements, each in a fresh process (bench/common.run_measured);
all children run with the same number of torch threads (--threads, default 1; see its help).
- ours: the engine (library/svd_merge.merge_layers) over all modules, load + merge + save;
  and `svd_merge_lora.py` end to end when the script and library/formats are importable.
- dense: per module ΔW = Σ ratioᵢ·(αᵢ/rᵢ)·upᵢ@downᵢ in fp32, `torch.linalg.svd(full_matrices=False)` (thin —
  already faster than sd-scripts' full_matrices=True), truncate to the rank. A dense SVD of every module
  takes about an hour for SDXL on 2 cores, so it runs on `--per_shape` modules of each distinct shape, and
  the whole-file figure is Σ over shapes of (mean time of that shape × number of modules of that shape).
  Ours is also timed on exactly that subset, for a like-for-like ratio.
- agreement: on the subset, the singular values of both outputs (ours from its factors, exactly) compared:
  max |σᵢ − σᵢ_dense| / σᵢ_dense over the kept ones (target ≤ 1e-4), and the relative Frobenius
  distance between the two rank-k results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import report, run_measured  # noqa: E402
from bench.fixtures import flux_modules, kohya_metadata, make_lora, sdxl_modules, write_lora  # noqa: E402

RATIOS = (1.0, 0.7)

# Child: our engine on the given files (optionally only some modules), output saved in fp32.
OURS = r"""
import json, os, sys, time
from collections import defaultdict
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
from library.safetensors_io import load_tensors, save_tensors
from library.svd_merge import LayerJob, MergeSettings, merge_layers
from networks import adapter_from_tensors
paths, ratios, rank, out, only = sys.argv[1].split(","), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
only = set(json.loads(only)) if only != "-" else None
t0 = time.perf_counter()
parts = defaultdict(list)
for slot, path in enumerate(paths):
    tensors, _ = load_tensors(path)
    modules = defaultdict(dict)
    for key, t in tensors.items():
        name, suffix = key.split(".", 1)
        if only is None or name in only:
            modules[name][suffix] = t
    for name, ts in modules.items():
        parts[name].append((slot, adapter_from_tensors(ts, name), ratios[slot]))
jobs = [LayerJob(n, p[0][1].out_shape, p) for n, p in parts.items()]
t1 = time.perf_counter()
results = merge_layers(jobs, MergeSettings(new_rank=rank, new_conv_rank=rank))
t2 = time.perf_counter()
tensors = {}
for r in results.values():
    tensors[r.name + ".lora_up.weight"] = r.up.float()
    tensors[r.name + ".lora_down.weight"] = r.down.float()
    tensors[r.name + ".alpha"] = torch.tensor(r.alpha)
save_tensors(out, tensors, overwrite=True)
t3 = time.perf_counter()
print(json.dumps({"load_s": round(t1 - t0, 3), "merge_s": round(t2 - t1, 3), "save_s": round(t3 - t2, 3),
                  "total_s": round(t3 - t0, 3), "modules": len(jobs)}))
"""

# Child: what sd-scripts, PEFT and the ComfyUI mergers do — dense delta, dense SVD, per module.
DENSE = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
from library.safetensors_io import load_tensors, save_tensors
paths, ratios, rank, out, only = sys.argv[1].split(","), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
only = json.loads(only)
t0 = time.perf_counter()
files = [load_tensors(p)[0] for p in paths]
t1 = time.perf_counter()
tensors, per_module = {}, {}
for name in only:
    start = time.perf_counter()
    delta = None
    for ratio, f in zip(ratios, files):
        if name + ".lora_down.weight" not in f:
            continue
        down, up = f[name + ".lora_down.weight"].float(), f[name + ".lora_up.weight"].float()
        r = down.shape[0]
        scale = float(f[name + ".alpha"]) / r if name + ".alpha" in f else 1.0
        term = ratio * scale * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
        delta = term if delta is None else delta + term
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    tensors[name + ".lora_up.weight"] = (U[:, :k] * S[:k]).contiguous()
    tensors[name + ".lora_down.weight"] = Vh[:k].contiguous()
    tensors[name + ".alpha"] = torch.tensor(float(k))
    per_module[name] = time.perf_counter() - start
t2 = time.perf_counter()
save_tensors(out, tensors, overwrite=True)
print(json.dumps({"load_s": round(t1 - t0, 3), "svd_s": round(t2 - t1, 3), "per_module": per_module}))
"""

SCRIPT = r"""
import json, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run([sys.executable, "svd_merge_lora.py", "--models", *sys.argv[1].split(","), "--ratios",
                       *[str(r) for r in json.loads(sys.argv[2])], "--new_rank", sys.argv[3], "--save_to", sys.argv[4],
                       "--save_precision", "float", "--overwrite", "--device", "cpu"], capture_output=True, text=True)
if proc.returncode:
    raise SystemExit(proc.stderr[-2000:])
print(json.dumps({"total_s": round(time.perf_counter() - t0, 3)}))
"""


def build_case(case: str, folder: str, rank: int) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    if case == "sdxl":
        modules, family = sdxl_modules("attention"), "sdxl"
    else:
        modules, family = flux_modules(double_blocks=(0, 1), single_blocks=(0, 1)), "flux1"
    paths = []
    for i in range(2):
        path = os.path.join(folder, f"{case}_{i}.safetensors")
        # Different alphas so the scales matter: alpha 16 and 32 at rank 32.
        alpha = (16.0, 32.0)[i]
        write_lora(path, make_lora(modules, rank, alpha=alpha, seed=100 + i), kohya_metadata(family, rank, alpha))
        paths.append(path)
    return paths, {m.name: m.shape for m in modules}


def sample(shapes: dict[str, tuple[int, ...]], per_shape: int) -> list[str]:
    """`per_shape` modules of each distinct shape, spread over the file (first, last, ...)."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    chosen = []
    for names in by_shape.values():
        step = max(1, len(names) // per_shape)
        chosen += names[::step][:per_shape]
    return chosen


def spectra(path: str, names: list[str]) -> dict:
    from library.lowrank import factored_svd
    from library.safetensors_io import load_tensors

    tensors, _ = load_tensors(path)
    out = {}
    for name in names:
        down, up = tensors[name + ".lora_down.weight"].double(), tensors[name + ".lora_up.weight"].double()
        k = down.shape[0]
        scale = float(tensors[name + ".alpha"]) / k
        out[name] = factored_svd(scale * up.reshape(up.shape[0], k), down.reshape(k, -1), dtype=torch.float64)
    return out


def compare(ours_path: str, dense_path: str, names: list[str]) -> dict:
    ours, dense = spectra(ours_path, names), spectra(dense_path, names)
    worst_sv, worst_fro = 0.0, 0.0
    for name in names:
        a, b = ours[name], dense[name]
        k = min(a.S.numel(), b.S.numel())
        worst_sv = max(worst_sv, float(((a.S[:k] - b.S[:k]).abs() / b.S[:k]).max()))
        diff = a.matrix() - b.matrix()
        worst_fro = max(worst_fro, float(diff.norm() / b.matrix().norm()))
    return {"max_rel_sv_diff": worst_sv, "max_rel_fro_diff": worst_fro, "compared_modules": len(names)}


def run_case(case: str, folder: str, rank: int, per_shape: int) -> dict:
    paths, shapes = build_case(case, folder, rank)
    args = [",".join(paths), json.dumps(list(RATIOS)), str(rank)]
    subset = sample(shapes, per_shape)
    ours_all = run_measured(OURS, *args, os.path.join(folder, f"{case}_ours.safetensors"), "-")
    ours_sub = run_measured(OURS, *args, os.path.join(folder, f"{case}_ours_sub.safetensors"), json.dumps(subset))
    dense = run_measured(DENSE, *args, os.path.join(folder, f"{case}_dense.safetensors"), json.dumps(subset))
    counts = Counter(shapes.values())
    per_shape_time: dict[tuple[int, ...], list[float]] = {}
    for name, seconds in dense["per_module"].items():
        per_shape_time.setdefault(shapes[name], []).append(seconds)
    dense_full = sum(counts[s] * sum(t) / len(t) for s, t in per_shape_time.items())
    figures = {
        "modules": len(shapes),
        "ours_all_total_s": ours_all["total_s"],
        "ours_all_merge_s": ours_all["merge_s"],
        "ours_all_peak_rss_mib": ours_all["children_max_rss_mib"],
        "dense_full_estimate_s": round(dense_full, 1),
        "speedup_full_estimate": round(dense_full / ours_all["merge_s"], 1),
        "subset_modules": len(subset),
        "subset_ours_merge_s": ours_sub["merge_s"],
        "subset_dense_svd_s": dense["svd_s"],
        "speedup_subset_measured": round(dense["svd_s"] / ours_sub["merge_s"], 1),
        "dense_s_per_shape": {"x".join(map(str, s)): round(sum(t) / len(t), 3) for s, t in per_shape_time.items()},
    }
    figures.update(compare(os.path.join(folder, f"{case}_ours_sub.safetensors"),
                           os.path.join(folder, f"{case}_dense.safetensors"), subset))
    if os.path.exists(os.path.join(ROOT, "svd_merge_lora.py")):
        try:
            script = run_measured(SCRIPT, *args, os.path.join(folder, f"{case}_script.safetensors"))
            figures["script_end_to_end_s"] = script["total_s"]
        except RuntimeError as exc:
            figures["script_end_to_end_s"] = f"failed: {str(exc).splitlines()[-1][:200]}"
    return figures


def run_ties(rank: int, per_shape: int, density: float = 0.5) -> dict:
    """`--mode ties` of three SDXL LoRAs (UNet attention + both text encoders): the dense delta-space merge per
    layer, timed on `per_shape` layers of each distinct shape and scaled by the layer counts. "topk" is the
    magnitude selection PEFT uses (the one we had: over 900 s for such a merge), "ours" is
    merge_methods.magnitude_mask; both in this process, same layers, same masks up to ties."""
    import time

    from library import merge_methods
    from library.svd_merge import LayerJob, MergeSettings, merge_layers
    from networks import adapter_from_tensors

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    modules = sdxl_modules("attention")
    shapes = {m.name: m.shape for m in modules}
    chosen = sample(shapes, per_shape)
    loras = [make_lora([m for m in modules if m.name in chosen], rank, alpha=16.0, seed=200 + i) for i in range(3)]
    jobs = [LayerJob(name, shapes[name], [(i, adapter_from_tensors(
        {s: lora[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha")}, name), 1.0)
        for i, lora in enumerate(loras)]) for name in chosen]

    def topk_mask(tensor, d):  # PEFT's magnitude_based_pruning
        k = int(d * tensor.numel())
        mask = torch.zeros(tensor.numel(), dtype=torch.bool)
        mask[tensor.abs().reshape(-1).topk(k).indices] = True
        return mask.reshape(tensor.shape)

    timings = {}
    for label, mask_fn in (("topk", topk_mask), ("ours", merge_methods.magnitude_mask)):
        saved, merge_methods.magnitude_mask = merge_methods.magnitude_mask, mask_fn
        per_layer: dict[str, float] = {}
        last = [time.perf_counter()]

        def done(layer, per_layer=per_layer, last=last):
            now = time.perf_counter()
            per_layer[layer.name], last[0] = now - last[0], now

        try:
            merge_layers(jobs, MergeSettings(mode="ties", density=density, new_rank=rank), on_done=done)
        finally:
            merge_methods.magnitude_mask = saved
        by_shape: dict[tuple, list[float]] = {}
        for name, seconds in per_layer.items():
            by_shape.setdefault(shapes[name], []).append(seconds)
        counts = Counter(shapes.values())
        timings[label] = sum(counts[s] * sum(t) / len(t) for s, t in by_shape.items())
    return {"modules": len(shapes), "timed_modules": len(chosen), "density": density,
            "topk_full_estimate_s": round(timings["topk"], 1), "ours_full_estimate_s": round(timings["ours"], 1),
            "speedup": round(timings["topk"] / timings["ours"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("sdxl", "flux", "both", "ties"), default="both",
                        help="ties: --mode ties of three SDXL LoRAs, PEFT's topk selection against ours (in process)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--per_shape", type=int, default=2, help="dense-SVD modules timed per distinct shape")
    parser.add_argument("--folder", default=None, help="where to write the fixture files (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every child, ours and dense alike (default 1: on a shared 2-core VM, "
                             "2 OpenMP threads stall in LAPACK whenever another process holds a core)")
    args = parser.parse_args()
    os.environ["BENCH_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.case == "ties":
        report(f"svd_merge ties 3 x SDXL rank {args.rank} -> {args.rank}", run_ties(args.rank, args.per_shape))
        return
    cases = ("sdxl", "flux") if args.case == "both" else (args.case,)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for case in cases:
            per_shape = args.per_shape if case == "sdxl" else max(1, args.per_shape // 2)
            report(f"svd_merge {case} rank {args.rank}+{args.rank} -> {args.rank}",
                   run_case(case, folder, args.rank, per_shape))


if __name__ == "__main__":
    main()
