"""library.plots: PNGs of the right size whose bars and cells follow the values, written under the destination
rules; without matplotlib, one line saying how to install it (the import blocked here)."""

import sys

import pytest

import lora_compare
import lora_info
from library.errors import LoraToolsError
from library.plots import BAR_COLOR, INSTALL_HINT, BarPanel, bar_chart, heatmap, require_matplotlib
from tests.helpers import SD1_IN_CONV, SD1_OUT_LOKR, SD1_OUT_Q, mixed_sd1_lora, run_cli_status, temp_files, write_lora


def _pixels(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size, img.convert("RGB").load()


def _column_heights(size, px, rgb) -> list[int]:
    """Per run of adjacent columns holding `rgb` pixels, the tallest column's count (one entry per bar)."""
    width, height = size
    runs, current = [], 0
    for x in range(width):
        n = sum(1 for y in range(height) if all(abs(c - e) < 8 for c, e in zip(px[x, y], rgb)))
        if n:
            current = max(current, n)
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_bar_heights_follow_values(tmp_path):
    pytest.importorskip("matplotlib")
    path = bar_chart([BarPanel("norms", ["IN04", "M00", "OUT03"], [1.0, 3.0, 2.0], "norm")], "t", tmp_path / "b.png")
    size, px = _pixels(path)
    assert size == (700, 380) and (tmp_path / "b.png").stat().st_size > 5_000
    rgb = tuple(int(BAR_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    heights = _column_heights(size, px, rgb)
    assert len(heights) == 3
    assert heights[1] / heights[0] == pytest.approx(3.0, rel=0.03)
    assert heights[2] / heights[0] == pytest.approx(2.0, rel=0.03)


def test_grouped_bars_and_grid_of_panels(tmp_path):
    pytest.importorskip("matplotlib")
    labels = [f"layer{i}" for i in range(150)]
    groups = ["IN04"] * 50 + ["M00"] * 40 + ["OUT00"] * 60
    panels = [BarPanel("per layer", labels, [float(i % 7) for i in range(150)], "norm", groups),
              BarPanel("log", ["a", "b"], [1e-3, 10.0], "x", log=True), BarPanel("gap", ["a"], [None])]
    path = bar_chart(panels, "grid", tmp_path / "g.png", columns=2)
    size, _ = _pixels(path)
    assert size == (1400, 700)


def test_heatmap_cells_follow_values(tmp_path):
    pytest.importorskip("matplotlib")
    path = heatmap([[0.0, 1.0], [1.0, None]], ["IN04", "OUT00"], ["a~b", "a~c"], "cosine", tmp_path / "h.png",
                   vmin=0.0, vmax=1.0, cmap="gray", annotate=False)
    size, px = _pixels(path)
    assert size[0] > 300 and size[1] > 100
    # The image area's corners: find the darkest (value 0) and lightest (value 1) cells along a row through it.
    row = [px[x, size[1] // 3] for x in range(size[0])]
    blacks = [x for x, p in enumerate(row) if max(p) < 10]
    whites_inside = [x for x, p in enumerate(row) if min(p) > 245 and blacks and blacks[0] < x]
    assert blacks and whites_inside  # 0.0 is black, 1.0 is white on the gray map
    with pytest.raises(LoraToolsError, match="heat map needs"):
        heatmap([[1.0]], ["a", "b"], ["x"], "bad", tmp_path / "bad.png")


def test_written_like_every_output(tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "b.png"
    target.write_bytes(b"old")
    with pytest.raises(LoraToolsError, match="exists"):
        bar_chart([BarPanel("x", ["a"], [1.0])], "t", target)
    assert target.read_bytes() == b"old" and not temp_files(tmp_path)


def test_missing_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    tensors = mixed_sd1_lora(0, skip=(SD1_IN_CONV, SD1_OUT_Q, SD1_OUT_LOKR))
    a = write_lora(str(tmp_path / "a.safetensors"), tensors)
    b = write_lora(str(tmp_path / "b.safetensors"), mixed_sd1_lora(1, skip=(SD1_IN_CONV, SD1_OUT_Q, SD1_OUT_LOKR)))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(LoraToolsError, match="requirements-extras.txt"):
        require_matplotlib()
    for script, argv in ((lora_info, [a, "--plot", str(tmp_path / "i.png")]),
                         (lora_compare, [a, b, "--plot", str(tmp_path / "c.png")])):
        code, (out, err) = run_cli_status(script, argv, capsys)
        assert code == 2 and INSTALL_HINT in err and len(err.strip().splitlines()) == 1
        assert out == ""  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
