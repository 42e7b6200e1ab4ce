"""merge_models.py on SDXL-shaped checkpoints: wall time, CPU time and peak RSS beside a plain read of every
input plus the write of one output (the floor any streaming merge has), measured in the same run, and beside
sd-mecha when it is installed; `--sweep` repeats it for several input counts (the peak must not grow).

Usage: python bench/bench_merge_models.py [--scale 0.05] [--models 3] [--sweep 2 3 5]
                                          [--methods weighted_sum dare_ties] [--folder /tmp] [--no_embedding]
The lead's idle-box run (half-SDXL, ~3.5 GiB per input, 5 inputs need ~21 GB of disk):
    python bench/bench_merge_models.py --scale 0.5 --sweep 2 3 5 --methods weighted_sum dare_ties --folder /big/tmp

The checkpoints hold every `--scale`-th share of SDXL's UNet and text-encoder weights (real names and full
shapes: the 1280×2048 / 10240×1280 projections, conv 1280×2560×3×3, …) in fp16, plus their biases, and
(unless --no_embedding) CLIP-G's 49408×1280 token embedding, SDXL's largest tensor (253 MB in float32), so
that the peak is the full model's. Elementwise methods (weighted_sum, add_difference, task_arithmetic) go
through each tensor in chunks: their peak does not depend on the tensor sizes or the input count. The
other methods take a first pass over each key for their statistics and hold one float32 |τ| buffer of it.
Time scales with the bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PEAK_RSS_SNIPPET, report, run_measured  # noqa: E402

MAKE = r"""
import sys, json, math, torch
from library.formats.registry import FAMILIES
from library.safetensors_io import StreamingWriter
scale, embedding, paths = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
table = FAMILIES["sdxl"].table
step = max(1, round(1 / scale))
specs = {}
for i, (k, shape) in enumerate(table.shapes.items()):
    if i % step == 0:
        specs[k] = (torch.float16, shape)
        specs[k[:-len(".weight")] + ".bias"] = (torch.float16, shape[:1])
if embedding == "1":
    specs["conditioner.embedders.1.model.token_embedding.weight"] = (torch.float16, (49408, 1280))
for n, path in enumerate(paths):
    g = torch.Generator().manual_seed(n)
    with StreamingWriter(path, specs, {"bench": "merge_models"}, overwrite=True) as w:
        for k, (dt, shape) in specs.items():
            w.write(k, (torch.randn(shape, generator=g) * 0.02).to(dt))
import os
print(json.dumps({"params": sum(math.prod(s) for _, s in specs.values()), "keys": len(specs),
                  "file_mib": round(os.path.getsize(paths[0]) / 2**20, 1)}))
"""

CPU_SNIPPET = (
    "def cpu_s():\n"
    "    usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    return round(usage.ru_utime + usage.ru_stime, 2)\n"
)

PLAIN = PEAK_RSS_SNIPPET + CPU_SNIPPET + r"""
import sys, time, torch
from library.safetensors_io import StreamingWriter, open_checkpoint
out, paths = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
readers = [open_checkpoint(p) for p in paths]
specs = {k: (readers[0].dtype(k), readers[0].shape(k)) for k in readers[0].file_order()}
with StreamingWriter(out, specs, overwrite=True) as w:
    for k in specs:  # in file order, as the merge reads
        tensors = [r.read(k) for r in readers]
        w.write(k, tensors[0])
        del tensors
print(json.dumps({"plain_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib(), "cpu_s": cpu_s()}))
"""

MERGE = PEAK_RSS_SNIPPET + CPU_SNIPPET + r"""
import sys, time, torch
import merge_models
from library.cli import parse_args
import library.model_merge_io, library.model_setup, library.recipe, library.metadata  # imports are not the merge
method, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
flags = ["--models", *paths, "--method", method, "--save_to", out, "--overwrite", "--device", "cpu", "--family", "sdxl"]
if method.startswith(("dare", "ties")):
    flags += ["--density", "0.3", "--seed", "1"]
merge_models.main(parse_args(merge_models.setup_parser(), flags))
print(json.dumps({"merge_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib(), "cpu_s": cpu_s()}))
"""

MECHA = PEAK_RSS_SNIPPET + r"""
import sys, time, torch, sd_mecha
out, paths = sys.argv[1], sys.argv[2:]
class Quiet:
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): pass
    def update(self, *a, **k): pass
    def set_postfix(self, *a, **k): pass
    def close(self): pass
start = time.perf_counter()
nodes = [sd_mecha.model(p, config="sdxl-sgm") for p in paths]
recipe = sd_mecha.n_average(*nodes) if len(nodes) > 2 else sd_mecha.weighted_sum(*nodes, alpha=0.5)
sd_mecha.merge(recipe, output=out, strict_mandatory_keys=False, check_extra_keys=False, merge_dtype=torch.float32,
               output_dtype=torch.float16, threads=0, tqdm=Quiet)
print(json.dumps({"mecha_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""


def measure(paths: list[str], out: str, methods: list[str], mecha: bool) -> dict:
    """Plain read+write, then each method, on the same files in the same run."""
    plain = run_measured(PLAIN, out, *paths)
    figures = {"plain_read_write_s": plain["plain_s"], "plain_cpu_s": plain["cpu_s"],
               "plain_peak_mib": plain["peak_rss_mib"]}
    for method in methods:
        merged = run_measured(MERGE, method, out, *paths)
        figures[f"{method}_s"] = merged["merge_s"]
        figures[f"{method}_cpu_s"] = merged["cpu_s"]
        figures[f"{method}_peak_mib"] = merged["peak_rss_mib"]
        figures[f"{method}_time_ratio"] = round(merged["merge_s"] / max(plain["plain_s"], 1e-9), 2)
    if mecha:
        try:
            import sd_mecha  # noqa: F401
        except ImportError:
            figures["sd_mecha"] = "not installed"
        else:
            result = run_measured(MECHA, out, *paths)
            figures["sd_mecha_mean_s"], figures["sd_mecha_peak_mib"] = result["mecha_s"], result["peak_rss_mib"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.05, help="share of SDXL's weights in each checkpoint")
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--sweep", type=int, nargs="+", default=None,
                        help="input counts to measure in turn (e.g. 2 3 5): the peak must not grow with the count")
    parser.add_argument("--methods", nargs="+", default=["weighted_sum", "dare_ties"])
    parser.add_argument("--no_embedding", action="store_true", help="leave out CLIP-G's token embedding")
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    counts = args.sweep or [args.models]
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        paths = [os.path.join(tmp, f"m{i}.safetensors") for i in range(max(counts))]
        out = os.path.join(tmp, "out.safetensors")
        made = run_measured(MAKE, str(args.scale), "0" if args.no_embedding else "1", *paths)
        for n in counts:
            figures = {"scale": args.scale, "models": n, "keys": made["keys"], "file_mib": made["file_mib"],
                       **measure(paths[:n], out, args.methods, mecha=n == counts[0])}
            report("merge_models", figures)


if __name__ == "__main__":
    main()
