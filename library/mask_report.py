"""What make_mask.py reports: the share of selected parameters per layer, per block and in total (DareMerge's
Mask Reporting), per-layer norms of a model or of its difference to a base (DareMerge's Model Reporting, as
numbers), and a PNG plot of either when matplotlib is installed (`pip install -r requirements-extras.txt`).

A block is a key cut after its first numeric component (`model.diffusion_model.input_blocks.4`,
`…encoder.layers.3`, `double_blocks.7`), or without its last component when it has none: family-free, so
any key set gets one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from library.destination import Destination, write_bytes
from library.errors import LoraToolsError
from library.plots import new_figure, png_bytes

NORM_CHUNK = 1 << 22  # elements per float64 pass, so a norm never makes a float64 copy of a whole layer


def block_of(key: str) -> str:
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) or key


@dataclass
class MaskRow:
    key: str
    selected: int
    total: int

    @property
    def share(self) -> float:
        return self.selected / self.total if self.total else 0.0


def mask_summary(rows: Sequence[MaskRow]) -> dict:
    """JSON-ready: per layer, per block (in first-seen order) and total selected / total / share."""
    blocks: dict[str, list[int]] = {}
    for row in rows:
        acc = blocks.setdefault(block_of(row.key), [0, 0])
        acc[0] += row.selected
        acc[1] += row.total

    def entry(selected: int, total: int) -> dict:
        return {"selected": selected, "total": total, "share": selected / total if total else 0.0}

    selected, total = sum(r.selected for r in rows), sum(r.total for r in rows)
    return {"layers": {r.key: entry(r.selected, r.total) for r in rows},
            "blocks": {b: entry(s, t) for b, (s, t) in blocks.items()},
            "total": entry(selected, total)}


def format_mask_summary(summary: Mapping, title: str, verbose: int = 0) -> str:
    total = summary["total"]
    lines = [f"{title}: {total['selected']:,} of {total['total']:,} parameters selected "
             f"({100 * total['share']:.2f} %) in {len(summary['layers'])} tensors"]
    if verbose:
        table = summary["layers"] if verbose > 1 else summary["blocks"]
        width = max((len(k) for k in table), default=0)
        lines += [f"  {k:<{width}}  {v['selected']:>13,} / {v['total']:>13,}  {100 * v['share']:6.2f} %"
                  for k, v in table.items()]
    return "\n".join(lines)


# ---- model report -----------------------------------------------------------------------------------------

@dataclass
class NormRow:
    key: str
    numel: int
    norm: float       # ‖A‖_F
    mean: float
    std: float        # population standard deviation
    absmax: float
    delta_norm: float | None = None     # ‖A − base‖_F
    relative: float | None = None       # ‖A − base‖_F / ‖base‖_F


def _sums(flat: torch.Tensor) -> tuple[float, float, float]:
    total = squares = 0.0
    absmax = 0.0
    for start in range(0, flat.numel(), NORM_CHUNK):
        part = flat[start:start + NORM_CHUNK].to(torch.float64)
        total += float(part.sum())
        squares += float(part.square().sum())
        absmax = max(absmax, float(part.abs().max()))
    return total, squares, absmax


def norm_row(key: str, a: torch.Tensor, base: torch.Tensor | None = None) -> NormRow:
    """One layer's figures, summed in float64 chunk by chunk."""
    flat = a.reshape(-1)
    n = flat.numel()
    total, squares, absmax = _sums(flat) if n else (0.0, 0.0, 0.0)
    mean = total / n if n else 0.0
    row = NormRow(key, n, math.sqrt(squares), mean, math.sqrt(max(squares / n - mean * mean, 0.0)) if n else 0.0, absmax)
    if base is not None:
        if tuple(base.shape) != tuple(a.shape):
            raise LoraToolsError(f"shape {list(a.shape)} differs from the base's {list(base.shape)}", key=key)
        flat_b = base.reshape(-1)
        delta = sum(float((flat[s:s + NORM_CHUNK].to(torch.float64) - flat_b[s:s + NORM_CHUNK].to(torch.float64))
                          .square().sum()) for s in range(0, n, NORM_CHUNK))
        base_sq = _sums(flat_b)[1] if n else 0.0
        row.delta_norm = math.sqrt(delta)
        row.relative = math.sqrt(delta / base_sq) if base_sq else None
    return row


def model_summary(rows: Sequence[NormRow]) -> dict:
    return {"layers": [asdict(r) for r in rows],
            "total": {"parameters": sum(r.numel for r in rows),
                      "norm": math.sqrt(sum(r.norm ** 2 for r in rows)),
                      "delta_norm": math.sqrt(sum(r.delta_norm ** 2 for r in rows))
                      if rows and all(r.delta_norm is not None for r in rows) else None}}


def format_model_summary(summary: Mapping, title: str, verbose: int = 0) -> str:
    total = summary["total"]
    head = f"{title}: {len(summary['layers'])} tensors, {total['parameters']:,} parameters, ‖A‖ = {total['norm']:.6g}"
    if total["delta_norm"] is not None:
        head += f", ‖A − base‖ = {total['delta_norm']:.6g}"
    lines = [head]
    if verbose:
        width = max((len(r["key"]) for r in summary["layers"]), default=0)
        for r in summary["layers"]:
            line = f"  {r['key']:<{width}}  norm {r['norm']:11.5g}  mean {r['mean']:11.4g}  std {r['std']:10.4g}  " \
                   f"max|.| {r['absmax']:10.4g}"
            if r["delta_norm"] is not None:
                rel = "-" if r["relative"] is None else f"{r['relative']:.4g}"
                line += f"  ‖Δ‖ {r['delta_norm']:10.4g}  ‖Δ‖/‖base‖ {rel}"
            lines.append(line)
    return "\n".join(lines)


# ---- plot -------------------------------------------------------------------------------------------------

def plot_png(destination: Destination, title: str, series: Mapping[str, Sequence[float]], labels: Iterable[str],
             ylabel: str) -> str:
    """A line plot of per-layer values (one line per series) against the layer index, written atomically."""
    labels = list(labels)
    fig = new_figure(figsize=(max(8.0, min(40.0, len(labels) / 25)), 4.5), dpi=100)
    ax = fig.subplots()
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="." if len(values) < 200 else None, linewidth=1, label=name)
    # Tick the first layer of each block so the x axis says where in the model a value lies.
    ticks = [i for i, k in enumerate(labels) if i == 0 or block_of(k) != block_of(labels[i - 1])]
    step = max(1, len(ticks) // 40)
    ax.set_xticks(ticks[::step], [block_of(labels[i]).split(".", 2)[-1] for i in ticks[::step]],
                  rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return write_bytes(destination, png_bytes(fig))
