"""`python SCRIPT --help` imports no torch (issue 12, item 8): the help is what a user types first and what
pipelines call to probe a script, and torch's import costs seconds. Each script runs in a fresh interpreter
through runpy (bench/bench_help.py does the same to time it), then sys.modules is inspected."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT

# One script per line, so that branches adding theirs merge as one-line changes.
SCRIPTS = [
    "merge_lora.py",
    "flux_merge_lora.py",
    "convert_lora.py",
    "lora_info.py",
    "svd_merge_lora.py",
    "resize_lora.py",
    "extract_lora_from_models.py",
    "make_mask.py",
    "merge_models.py",
    "lora_compare.py",
    "merge_grid.py",
    "wan22_merge_lora.py",
]

PROBE = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], '--help']\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code or 0\n"
    "sys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))\n"
    "sys.exit(code)\n"
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_torch(script):
    proc = subprocess.run([sys.executable, "-c", PROBE, script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--help" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "torch imported: False"
