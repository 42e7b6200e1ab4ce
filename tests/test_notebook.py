"""examples/loratools_colab.ipynb runs: a plain runner executes its code cells in order in one namespace (as a
kernel would), from the examples/ folder, offline (the notebook's pip step is skipped by its env switch)."""

import json
import os
import shutil
import sys

import pytest

from tests.helpers import ROOT

NOTEBOOK = os.path.join(ROOT, "examples", "loratools_colab.ipynb")


def _cells(kind: str) -> list[dict]:
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    return [c for c in nb["cells"] if c["cell_type"] == kind]


def test_notebook_is_stored_clean_and_runs_every_script():
    code = _cells("code")
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    sources = ["".join(c["source"]) for c in code]
    for script in ("lora_info", "lora_compare", "svd_merge_lora", "resize_lora", "convert_lora", "merge_grid"):
        assert any(f'run("{script}"' in s for s in sources), script
    assert not any(line.lstrip().startswith(("!", "%")) for s in sources for line in s.splitlines())  # plain Python


def test_notebook_code_cells_run(monkeypatch, one_thread):
    pytest.importorskip("matplotlib")
    from PIL import Image

    monkeypatch.setenv("LORATOOLS_NOTEBOOK_TEST", "1")
    monkeypatch.chdir(os.path.join(ROOT, "examples"))  # where Jupyter starts when the notebook is opened
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace: dict = {"__name__": "__main__"}
    try:
        for cell in _cells("code"):
            exec(compile("".join(cell["source"]), f"{NOTEBOOK}:{cell['id']}", "exec"), namespace)
        work = namespace["WORK"]
        for name in ("style_b_info.png", "a_vs_b.png", "merge_vs_resize.png", "grid/grid.png"):
            with Image.open(os.path.join(work, name)) as img:
                assert img.format == "PNG" and img.width > 300 and img.height > 200
        for name in ("ab_svd.safetensors", "ab_rank4.safetensors", "ab_rank4_peft.safetensors"):
            assert os.path.getsize(os.path.join(work, name)) > 1000
        with open(os.path.join(work, "grid", "grid.csv")) as f:
            assert len(f.read().strip().splitlines()) == 1 + 3 * 2  # header + ratio_a × mode cells
        assert [t for t, _ in namespace["info"][0]["tags"]] == ["painting", "portrait", "sky"]
        pairs = namespace["pairs"]
        assert pairs[2]["overall"]["cosine"] == pytest.approx(1.0, abs=1e-6)  # a conversion is exact
        assert 0.0 < pairs[0]["overall"]["cosine"] < 1.0  # a rank-4 resize of a rank-8 merge loses something
    finally:
        if "WORK" in namespace:
            shutil.rmtree(namespace["WORK"], ignore_errors=True)
