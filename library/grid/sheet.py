"""The sweep's pictures: a PNG grid of each metric over the x × y cells, and the labelled contact sheet of
the cells' images (the image path). Both are matplotlib figures (library.plots.new_figure) built from the rows
the runner gathered; a failed cell is a grey square marked "failed"."""

from __future__ import annotations

import math

from library.grid.spec import Axis, _text
from library.plots import new_figure

SHOWN = ("relative_error", "energy_retained", "cosine", "norm_ratio")


def _ticks(axis: Axis | None) -> list[str]:
    return [_text(v) for v in axis.values] if axis else [""]


def metrics_figure(rows: list[dict], x: Axis | None, y: Axis | None, shown=SHOWN):
    """One heat map per metric: rows are y values, columns x values, each square annotated with its value."""
    import matplotlib
    import numpy as np

    n_rows, n_cols = (len(y.values) if y else 1), (len(x.values) if x else 1)
    fig = new_figure(figsize=(max(3.5, 0.9 * n_cols + 2.5) * len(shown), 0.7 * n_rows + 2.2), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        grid = np.full((n_rows, n_cols), np.nan)
        for row in rows:
            value = row.get(metric)
            if row["status"] == "ok" and value is not None and math.isfinite(value):
                grid[row["row"], row["col"]] = value
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
        for r in range(n_rows):
            for c in range(n_cols):
                missing = math.isnan(grid[r, c])
                text = "failed" if missing else f"{grid[r, c]:.3g}"
                bright = missing or float(image.norm(grid[r, c])) > 0.6  # viridis turns yellow towards 1
                ax.text(c, r, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
        ax.set_xticks(range(n_cols), _ticks(x))
        ax.set_yticks(range(n_rows), _ticks(y))
        ax.set_xlabel(x.name if x else "")
        ax.set_ylabel(y.name if y else "")
        ax.set_title(metric)
        fig.colorbar(image, ax=ax, shrink=0.9)
    fig.suptitle("merge_grid: each cell against the exact merge Σ ratioᵢ·ΔWᵢ")
    return fig


def contact_sheet(tiles: dict[int, object], labels: dict[int, str], n_rows: int, n_cols: int):
    """Cell images in their grid position, each titled with its settings; returns (figure, titles drawn)."""
    fig = new_figure(figsize=(3.0 * n_cols, 3.4 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    titles = []
    for index in range(n_rows * n_cols):
        ax = axes[index // n_cols][index % n_cols]
        ax.set_axis_off()
        if index in labels:
            if tiles.get(index) is not None:
                ax.imshow(tiles[index])
            else:
                ax.text(0.5, 0.5, "failed", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(labels[index].replace(" ", "\n"), fontsize=9)
            titles.append(labels[index])
    return fig, titles
