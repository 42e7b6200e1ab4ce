"""Helpers shared by the benchmarks: peak memory of a child process, timing, result printing."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_measured(code: str, *args: str, cwd: str = ROOT, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python and return its wall time and peak RSS (MiB), so runs don't share memory.
    `cwd`/`env`: another project's checkout and its own packages (bench_extract's sd-scripts run)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    result = json.loads(last) if last.startswith("{") else {}
    result.setdefault("wall_s", round(wall, 2))
    result["children_max_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


# Peak RSS of the child's own address space (VmHWM). ru_maxrss survives fork+exec on Linux, so a child of a
# torch-importing bench reports at least the parent's size with PEAK_RSS_SNIPPET.
PEAK_HWM_SNIPPET = (
    "import json\n"
    "def peak_mib():\n"
    "    with open('/proc/self/status') as f:\n"
    "        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))\n"
    "    return round(kb / 1024, 1)\n"
)

PEAK_RSS_SNIPPET = (
    "import resource, json\n"
    "def peak_mib():\n"
    "    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)\n"
)


def report(name: str, figures: dict) -> None:
    print(f"{name}: " + json.dumps(figures, sort_keys=True))
