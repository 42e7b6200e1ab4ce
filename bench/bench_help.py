"""Start-up cost of every root script: wall time of `python SCRIPT --help`, and whether torch was imported.

`--help` is what a user types first and what pipelines call to probe a script; it should cost what the
Python interpreter costs, not what torch's import costs (about 2 s). Each script runs several times in a
fresh interpreter and the median is reported, next to `python -c pass` measured the same way.

    python bench/bench_help.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, report

SCRIPTS = ["merge_lora.py", "svd_merge_lora.py", "resize_lora.py", "extract_lora_from_models.py",
           "flux_merge_lora.py", "convert_lora.py", "lora_info.py"]

# Runs the script's --help in-process so that sys.modules can be inspected afterwards.
PROBE = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], '--help']\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n"
)


def median_seconds(argv: list[str], repeat: int) -> tuple[float, str]:
    times, stderr = [], ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} failed:\n{proc.stderr[-2000:]}")
        stderr = proc.stderr
    return statistics.median(times), stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    interpreter, _ = median_seconds([sys.executable, "-c", "pass"], args.repeat)
    report("python -c pass", {"median_s": round(interpreter, 3)})
    for script in SCRIPTS:
        seconds, stderr = median_seconds([sys.executable, "-c", PROBE, script], args.repeat)
        report(f"{script} --help", {"median_s": round(seconds, 3),
                                    "torch_imported": "torch imported: True" in stderr})


if __name__ == "__main__":
    main()
