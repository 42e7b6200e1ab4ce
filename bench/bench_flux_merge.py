"""flux_merge_lora.py into a Flux checkpoint: peak memory and time against a plain copy of the same file.

Usage: python bench/bench_flux_merge.py [--double 2] [--single 4] [--rank 16] [--folder /tmp]

The checkpoint has FLUX.1's real BFL names and full widths (3072, qkv 9216, linear1 21504, mlp 12288),
every non-block weight, biases on every Linear, in bf16, but only `--double` double and `--single` single
blocks (the real model has 19 and 38). The LoRA is AI-Toolkit style (diffusers names, `transformer.`
prefix, split q/k/v, rank `--rank`) on every Linear of those blocks: the case of the bug report.
Memory is bounded by the largest single tensor (linear1: 21504×3072) plus the LoRA file, not by the
number of blocks, so the peak extrapolates unchanged to the full model; time scales with the bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PEAK_RSS_SNIPPET, report, run_measured  # noqa: E402

MAKE = r"""
import sys, re, torch, json
from library.formats import FAMILIES, read_lora
from library.lora_output import output_dtype, write_lora as write_through_writer
from library.safetensors_io import StreamingWriter
from bench.fixtures import flux_modules, make_lora, write_lora
ck, lora_kohya, lora_ait = sys.argv[1:4]
nd, ns, rank = (int(x) for x in sys.argv[4:7])
table = FAMILIES["flux1"].table
def keep(k):
    m = re.match(r"(double|single)_blocks\.(\d+)\.", k)
    return m is None or int(m[2]) < (nd if m[1] == "double" else ns)
specs = {}
for k, comp in table.components.items():
    if comp == "transformer" and keep(k):
        specs[k] = (torch.bfloat16, table.shapes[k])
        specs[k[:-len(".weight")] + ".bias"] = (torch.bfloat16, table.shapes[k][:1])
g = torch.Generator().manual_seed(0)
with StreamingWriter(ck, specs, {"bench": "flux"}, overwrite=True) as w:
    for k, (dt, shape) in specs.items():
        w.write(k, (torch.randn(shape, generator=g) * 0.02).to(dt))
t = make_lora(flux_modules(range(nd), range(ns)), rank, dtype=torch.bfloat16)
write_lora(lora_kohya, t, {"ss_base_model_version": "flux1"})
kohya = read_lora(lora_kohya)
write_through_writer(lora_ait, kohya.modules, kohya.family, "ai-toolkit", dtype=output_dtype([kohya]), script="bench",
                     args=None, inputs=[lora_kohya], base_metadata=kohya.metadata, overwrite=True)
print(json.dumps({"params": sum(__import__("math").prod(s) for _, s in specs.values())}))
"""

COPY = PEAK_RSS_SNIPPET + r"""
import sys, time, shutil, os
start = time.perf_counter()
shutil.copyfile(sys.argv[1], sys.argv[2])
with open(sys.argv[2], "rb+") as f:
    os.fsync(f.fileno())
print(json.dumps({"copy_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""

MERGE = PEAK_RSS_SNIPPET + r"""
import sys, time
import flux_merge_lora
start = time.perf_counter()
args = flux_merge_lora.setup_parser().parse_args(["--flux_model", sys.argv[1], "--models", sys.argv[2],
    "--save_to", sys.argv[3], "--working_device", "cpu", "--overwrite"])
flux_merge_lora.main(args)
print(json.dumps({"merge_s": round(time.perf_counter() - start, 2), "peak_rss_mib": peak_mib()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    ck = os.path.join(args.folder, "bench_flux_ckpt.safetensors")
    kohya = os.path.join(args.folder, "bench_flux_lora_kohya.safetensors")
    ait = os.path.join(args.folder, "bench_flux_lora_aitoolkit.safetensors")
    copy = os.path.join(args.folder, "bench_flux_copy.safetensors")
    out = os.path.join(args.folder, "bench_flux_merged.safetensors")
    try:
        made = run_measured(MAKE, ck, kohya, ait, str(args.double), str(args.single), str(args.rank))
        size_gib = os.path.getsize(ck) / 2**30
        copied = run_measured(COPY, ck, copy)
        os.remove(copy)  # the full-size checkpoint, its copy and the output would not fit beside each other
        merged = run_measured(MERGE, ck, ait, out)
        full_gib = size_gib / made["params"] * 11.9e9  # FLUX.1-dev transformer: ≈11.9 B parameters
        report("flux_merge", {
            "blocks": f"{args.double} double + {args.single} single (full model: 19 + 38)",
            "checkpoint_gib": round(size_gib, 2), "lora_mib": round(os.path.getsize(ait) / 2**20, 1),
            "copy_s": copied["copy_s"], "merge_s": merged["merge_s"],
            "merge_vs_copy": round(merged["merge_s"] / max(copied["copy_s"], 1e-6), 1),
            "merge_peak_rss_mib": merged["peak_rss_mib"],
            "full_model_gib": round(full_gib, 1),
            "full_model_merge_s_estimate": round(merged["merge_s"] * full_gib / size_gib),
        })
    finally:
        for p in (ck, kohya, ait, copy, out):
            if os.path.exists(p):
                os.remove(p)


if __name__ == "__main__":
    main()
