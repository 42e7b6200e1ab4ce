"""The README's quick start runs end to end and leaves the files it announces."""

import os
import subprocess
import sys

from safetensors import safe_open

from tests.helpers import ROOT


def test_quickstart_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--keep", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("style_a_peft", "ab_concat", "ab_svd", "a_small"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert len(list(f.keys())) > 0
    with safe_open(str(tmp_path / "ab_concat.safetensors"), "pt") as f:
        # concat of rank 8 and rank 4 inputs: rank 12
        key = next(k for k in f.keys() if k.endswith("lora_down.weight"))
        assert f.get_tensor(key).shape[0] == 12
