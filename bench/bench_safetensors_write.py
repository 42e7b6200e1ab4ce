"""Peak memory of the streaming writer: a 4 GB safetensors file must be written under 1 GB RSS.

Usage: python bench/bench_safetensors_write.py [--gib 4] [--folder /tmp]
Each tensor is made, written and dropped in turn; the child process reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import PEAK_RSS_SNIPPET, report, run_measured  # noqa: E402

CHILD = PEAK_RSS_SNIPPET + r"""
import sys, time, torch
from library.safetensors_io import StreamingWriter
path, gib = sys.argv[1], float(sys.argv[2])
# SDXL-like tensor sizes: 2560x10240 fp16 = 50 MiB each.
shape = (2560, 10240)
count = int(gib * 1024 / 50)
specs = {f"model.diffusion_model.block.{i}.weight": (torch.float16, shape) for i in range(count)}
start = time.perf_counter()
with StreamingWriter(path, specs, {"bench": "1"}, overwrite=True) as w:
    for key in specs:
        w.write(key, torch.full(shape, 0.5, dtype=torch.float16))
elapsed = time.perf_counter() - start
size = __import__("os").path.getsize(path)
print(json.dumps({"file_gib": round(size / 2**30, 2), "write_s": round(elapsed, 2), "peak_rss_mib": peak_mib()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    path = os.path.join(args.folder, "bench_write.safetensors")
    try:
        figures = run_measured(CHILD, path, str(args.gib))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    figures["rate_gib_s"] = round(figures["file_gib"] / figures["write_s"], 2)
    report("streaming safetensors write", figures)


if __name__ == "__main__":
    main()
