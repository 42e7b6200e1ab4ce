"""PNG charts: bar charts (one or more panels) and a heat map, written like every other output.

matplotlib is optional (requirements-extras.txt): it is imported when a chart is drawn, and its absence is
one line saying how to install it. The object API (`matplotlib.figure.Figure` on an Agg canvas) is used,
never pyplot, so drawing changes no global state (a notebook keeps its own backend). The PNG is rendered in
memory and written through library.destination (checked against the inputs, atomic, no-replace).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from library.destination import Destination, write_bytes
from library.errors import LoraToolsError

INSTALL_HINT = "matplotlib is not installed; charts need it: pip install -r requirements-extras.txt"
BAR_COLOR = "#1f77b4"  # one colour for plain bars (tests find bars by it)


def require_matplotlib():
    """The matplotlib module, or a one-line LoraToolsError saying how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (the part we use; fails the same way if broken)
    except ImportError:
        raise LoraToolsError(INSTALL_HINT) from None
    return matplotlib


@dataclass
class BarPanel:
    """One bar chart: a value per label. `groups` (one name per bar) colours bars by group and labels the
    x axis at each group's first bar instead of every bar (per-layer charts with hundreds of bars)."""

    title: str
    labels: Sequence[str]
    values: Sequence[float | None]
    ylabel: str = ""
    groups: Sequence[str] | None = None
    log: bool = False


@dataclass
class Chart:
    """Where a chart goes: a path (checked here) or a Destination the caller checked before the work."""

    path: str | os.PathLike | Destination
    inputs: Sequence[str] = field(default_factory=tuple)
    overwrite: bool = False

    def destination(self) -> Destination:
        if isinstance(self.path, Destination):
            return self.path
        return Destination(self.path, self.inputs, self.overwrite, flag="--plot")


def checked_png(path: str, inputs: Sequence[str], overwrite: bool = False, flag: str = "--plot") -> Destination:
    """A chart's destination checked before any work: a .png name, matplotlib present, and the path
    refused where it would land on an input (library.destination's rules)."""
    if not path.lower().endswith(".png"):
        raise LoraToolsError(f"{flag} must end in .png", file=path)
    require_matplotlib()
    destination = Destination(path, inputs, overwrite, flag=flag)
    destination.check()
    return destination


def matplotlib_available() -> bool:
    try:
        require_matplotlib()
    except LoraToolsError:
        return False
    return True


def new_figure(**kwargs):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global state), or the one-line install hint."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: int = 100, *, tight: bool = False) -> bytes:
    """The figure rendered as PNG in memory (the atomic writers of library.destination put it on disk)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return buffer.getvalue()


def _save(fig, where: str | os.PathLike | Destination | Chart, dpi: int) -> str:
    chart = where if isinstance(where, Chart) else Chart(where)
    return write_bytes(chart.destination(), png_bytes(fig, dpi))


def _draw_bars(ax, panel: BarPanel) -> None:
    values = [float("nan") if v is None else float(v) for v in panel.values]
    x = list(range(len(values)))
    if panel.groups is None:
        ax.bar(x, values, color=BAR_COLOR, width=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(list(panel.labels), rotation=90, fontsize=7 if len(x) > 20 else 8)
    else:
        import matplotlib

        names = list(dict.fromkeys(panel.groups))
        cmap = matplotlib.colormaps["tab20"]
        starts = [i for i, g in enumerate(panel.groups) if i == 0 or panel.groups[i - 1] != g]
        if len(x) > 60 and not panel.log:
            # One filled step outline per run of a group instead of one patch per bar: an SDXL LoRA has
            # ~1000 layers, and matplotlib draws a thousand Rectangles twenty times slower.
            for start, stop in zip(starts, starts[1:] + [len(x)]):
                run = [0.0 if math.isnan(v) else v for v in values[start:stop]]
                edges = [i - 0.5 for i in range(start, stop + 1)]
                ax.stairs(run, edges, fill=True, color=cmap(names.index(panel.groups[start]) % 20))
        else:
            ax.bar(x, values, color=[cmap(names.index(g) % 20) for g in panel.groups], width=0.8)
        ax.set_xticks(starts)
        ax.set_xticklabels([panel.groups[i] for i in starts], rotation=90, fontsize=7)
        ax.set_xlim(-0.5, len(x) - 0.5)
    if panel.log and any(v > 0 for v in values if not math.isnan(v)):
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_ylabel(panel.ylabel)
    ax.grid(axis="y", alpha=0.3)


def bar_chart(panels: Sequence[BarPanel], title: str, path: str | os.PathLike | Destination | Chart, *,
              columns: int = 1, panel_size: tuple[float, float] = (7.0, 3.2), dpi: int = 100) -> str:
    """Panels in a grid of `columns` (filled row by row) under one title, as a PNG at `path`; returns its path."""
    require_matplotlib()
    from matplotlib.figure import Figure

    if not panels:
        raise LoraToolsError("nothing to plot")
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            _draw_bars(ax, panels[i])
        else:
            ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path, dpi)


def heatmap(values: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str],
            title: str, path: str | os.PathLike | Destination | Chart, *, vmin: float | None = None,
            vmax: float | None = None, cmap: str = "viridis", colorbar_label: str = "",
            label_changes_only: bool = False, annotate: bool | None = None, dpi: int = 100) -> str:
    """values[row][col] as coloured cells (None/NaN blank), as a PNG at `path`; returns its path.

    `label_changes_only` labels a row only where its label differs from the row above (pass each layer's
    block name to get one label per block on a per-layer map). `annotate` writes each value in its cell
    (default: when the map has at most 200 cells).
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    grid = [[float("nan") if v is None else float(v) for v in row] for row in values]
    n_rows, n_cols = len(grid), len(col_labels)
    if n_rows == 0 or n_cols == 0 or any(len(row) != n_cols for row in grid) or len(row_labels) != n_rows:
        raise LoraToolsError(f"heat map needs {len(row_labels)} rows × {n_cols} values, got "
                             f"{[len(row) for row in grid]}")
    height = min(40.0, 1.5 + (0.12 if label_changes_only else 0.3) * n_rows)
    width = min(30.0, 3.5 + 0.9 * n_cols + 0.06 * max(len(str(s)) for s in row_labels))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(list(col_labels), rotation=30, ha="right", fontsize=8)
    if label_changes_only:
        ticks = [i for i in range(n_rows) if i == 0 or row_labels[i] != row_labels[i - 1]]
    else:
        ticks = list(range(n_rows))
    ax.set_yticks(ticks)
    ax.set_yticklabels([row_labels[i] for i in ticks], fontsize=7)
    if annotate if annotate is not None else n_rows * n_cols <= 200:
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi)


def show_png(path: str | os.PathLike):
    """An IPython image of a written chart, for notebooks (None outside IPython)."""
    try:
        from IPython.display import Image
    except ImportError:
        return None
    return Image(filename=os.fspath(path))
