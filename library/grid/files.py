"""What a sweep writes in --save_to DIR, every path checked by library.destination's rules (never an input,
never another output, an existing file replaced only when allowed) and written atomically:

    DIR/cells/<id>.safetensors   each cell's LoRA (not with --metrics_only), through the one LoRA writer
    DIR/cells/<id>.json          the cell's figures and the sweep settings it was made with: a cell whose
                                 .json exists is finished, and --resume skips it
    DIR/cells/<id>.png           the cell's image (image path)
    DIR/grid.csv, DIR/grid.json  one row per cell; DIR/grid.png the metric heat maps; DIR/sheet.png the
                                 contact sheet (image path)

--resume replaces the summary files and an unfinished cell's leftovers (a LoRA written before its .json);
otherwise an existing file needs --overwrite.
"""

from __future__ import annotations

import csv
import io
import json
import os

from library.destination import Destination, write_bytes, write_text
from library.errors import LoraToolsError
from library.grid.metrics import METRICS
from library.grid.spec import Cell

# Flags that say how to run, not what each cell is: they may change between a run and its --resume.
RUN_CONTROL = {"x", "y", "recipe", "save_to", "resume", "overwrite", "shard", "verbose", "debug", "dry_run",
               "config_file", "device"}


def fingerprint(args) -> dict:
    """The settings every cell of the sweep shares, JSON-ready (a finished cell must match them to be reused)."""
    values = {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}
    values["models"] = [os.path.abspath(m) for m in args.models]
    return json.loads(json.dumps(values, default=str))


class GridFiles:
    def __init__(self, folder: str, inputs: list[str], *, overwrite: bool, resume: bool):
        self.folder = os.path.abspath(folder)
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.replace = overwrite or resume
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise LoraToolsError("--save_to: must be a folder (cells, CSV/JSON and PNG go there)", file=self.folder)
        if not os.path.isdir(os.path.dirname(self.folder)):
            raise LoraToolsError("--save_to: its parent folder does not exist", file=self.folder)

    def path(self, cell: Cell, ext: str) -> str:
        return os.path.join(self.folder, "cells", f"{cell.id}.{ext}")

    def summary_path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.folder)

    def destination(self, path: str, replace: bool | None = None) -> Destination:
        return Destination(path, self.inputs, self.replace if replace is None else replace, flag="--save_to")

    def make_folders(self) -> None:
        os.makedirs(os.path.join(self.folder, "cells"), exist_ok=True)

    def check_cell(self, cell: Cell, exts: list[str]) -> None:
        """Before any work: every file the cell will write may be written."""
        for ext in exts:
            self.destination(self.path(cell, ext)).check()

    def check_summary(self, names: list[str]) -> None:
        for name in names:
            self.destination(self.summary_path(name)).check()

    def finished(self, cell: Cell, sweep: dict) -> dict | None:
        """The saved row of a finished cell made with the same settings, else None (refused when they differ)."""
        path = self.path(cell, "json")
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            same = saved["sweep"] == sweep and saved["row"]["label"] == cell.label
        except (OSError, ValueError, KeyError, TypeError):
            raise LoraToolsError("--resume: this cell record is unreadable; delete it to redo the cell",
                                 file=path) from None
        if not same:
            if self.overwrite:
                return None
            changed = sorted(k for k in set(sweep) | set(saved["sweep"]) if sweep.get(k) != saved["sweep"].get(k))
            raise LoraToolsError(f"--resume: this cell was made with other settings ({', '.join(changed) or 'cell'}); "
                                 "use another --save_to, or --overwrite to redo it", file=path)
        return saved["row"]

    def save_cell(self, cell: Cell, row: dict, sweep: dict, process: tuple[int, int] = (0, 1)) -> None:
        """The cell's record; `process` (index, count) says which accelerate process made it."""
        text = json.dumps({"sweep": sweep, "row": row, "process": list(process)}, indent=1)
        write_text(self.path(cell, "json"), text, inputs=self.inputs, overwrite=self.replace, flag="--save_to")

    def write_bytes(self, path: str, data: bytes, replace: bool | None = None) -> str:
        return write_bytes(self.destination(path, replace), data)


def block_names(rows: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("blocks") or {}))
    return list(names)


def csv_text(rows: list[dict], axis_names: list[str]) -> str:
    """One line per cell: position, settings, status, the metrics, ‖C‖ per block, files, error."""
    blocks = block_names(rows)
    head = ["index", "row", "col", "label", *axis_names, "status", *METRICS, "worst_layer", "layers", "norm",
            "norm_exact", *[f"norm:{b}" for b in blocks], "lora", "image", "error"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    for row in rows:
        per_block = row.get("blocks") or {}
        values = [row.get(k, "") for k in head[: head.index("norm_exact") + 1]]
        values += [per_block.get(b, "") for b in blocks] + [row.get(k, "") for k in ("lora", "image", "error")]
        writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in values])
    return out.getvalue()
