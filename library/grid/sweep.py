"""merge_grid.py's run, end to end: the values checked before any work, the output folder prepared, the
inputs read once, each cell merged (cells.py), measured (metrics.py), written and optionally rendered
(images.py) by the runner, then the summary files and a printed table on the main process."""

from __future__ import annotations

import copy
import io
import json

from library.errors import LoraToolsError
from library.grid.cells import Sweep, merge_cell, write_cell
from library.grid.files import GridFiles, csv_text, fingerprint
from library.grid.metrics import cell_metrics
from library.grid.runner import checked_everywhere, local_cells, process_state, run_cells, shard_cells
from library.grid.spec import FLAG_DEST, PARAMS, Axis, Cell, cell_settings
from library.svd_merge import MergeSettings

SUMMARY = ["grid.csv", "grid.json", "grid.png"]


def check_values(args, cells: list[Cell]) -> MergeSettings:
    """Every flag and every cell's settings, refused in one line before anything is read or written."""
    from library.inputs import ratios_for
    from library.lowrank_rules import check_dynamic_flags, check_quantile
    from library.svd_merge_io import merge_settings

    ratios_for(args.ratios, args.models)
    check_quantile(args.clamp_quantile)
    # The flags with the first cell's values: a swept dynamic_param need not also be given as a flag.
    first = copy.copy(args)
    for name, value in cells[0].params.items():
        if name in PARAMS:
            setattr(first, FLAG_DEST.get(PARAMS[name].field, PARAMS[name].field), value)
    settings = merge_settings(first)
    for cell in cells:
        try:
            checked = cell_settings(settings, cell.params)
            check_dynamic_flags(checked.dynamic_method, checked.dynamic_param)
        except LoraToolsError as exc:
            raise LoraToolsError(f"cell {cell.label}: {exc.message}") from None
    return settings


def cell_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"cell {row['index']} {row['label']}: FAILED: {row['error']}"
    return (f"cell {row['index']} {row['label']}: relative error {row['relative_error']:.4g}, energy retained "
            f"{row['energy_retained']:.4f}, cosine {row['cosine']:.4f}, norm ratio {row['norm_ratio']:.4f}")


class CellImages:
    """One pipeline per process, loaded once; each cell's deltas swapped in and out (images.DeltaSwapper)."""

    def __init__(self, args, device):
        from library.grid.images import load_pipeline

        self.args = args
        self.pipe = load_pipeline(args.base_model, device)

    def png(self, merge) -> bytes:
        from library.grid.images import DeltaSwapper, render, side_by_side
        from library.svd_merge_io import modules_from_results

        swapper = DeltaSwapper(self.pipe, merge.family)
        a = self.args
        with swapper.applied(modules_from_results(merge.groups, merge.results)):
            images = render(self.pipe, a.prompts, seed=a.seed, steps=a.steps, size=a.size, guidance=a.guidance)
        buffer = io.BytesIO()
        side_by_side(images).save(buffer, format="PNG")
        return buffer.getvalue()


def run_sweep(args, settings: MergeSettings, cells: list[Cell], x: Axis | None, y: Axis | None, *,
              bar: bool = True) -> dict:
    from library.block_weights import block_weights_for_models
    from library.checks import refusing_nonfinite
    from library.cli import resolve_device
    from library.inputs import lora_inputs
    from library.lora_output import output_format
    from library.plots import require_matplotlib

    state = process_state()
    if state.num_processes > 1 and args.device == "auto":
        settings.device = state.device  # one GPU per process
    files = GridFiles(args.save_to, args.models, overwrite=args.overwrite, resume=args.resume)
    sweep_id = fingerprint(args)
    mine = shard_cells(cells, args.shard)
    gather = args.shard is None
    exts = ["json"] + ([] if args.metrics_only else ["safetensors"]) + (["png"] if args.base_model else [])
    names = SUMMARY + (["sheet.png"] if args.base_model else [])
    checked_everywhere(state, lambda: require_matplotlib() if gather and state.is_main_process else None)
    if state.is_main_process:
        files.make_folders()
    state.wait_for_everyone()
    finished = (lambda cell: files.finished(cell, sweep_id)) if args.resume else (lambda cell: None)

    def check() -> None:  # every path checked before the first merge, so a bad one fails in a second
        for cell in local_cells(mine, state):  # this process's cells only: the others may be writing theirs
            if finished(cell) is None:
                files.check_cell(cell, exts)
        if gather and state.is_main_process:
            files.check_summary(names)

    checked_everywhere(state, check)

    block_weights = block_weights_for_models(args.lbws, len(args.models), presets_file=args.lbw_presets,
                                             seed=args.seed, x=args.lbw_x)
    with refusing_nonfinite():
        inputs = lora_inputs(args.models, args.ratios, block_weights, family=args.family,
                             allow_unmatched=args.allow_unmatched)
    sweep = Sweep(inputs, settings, output_format(args.format, inputs[0].lora), args)
    images = None
    if args.base_model:
        device = state.device if state.num_processes > 1 else resolve_device(args.device)
        images = CellImages(args, device)

    def work(cell: Cell) -> dict:
        merge = merge_cell(sweep, cell)
        row = {"index": cell.index, "row": cell.row, "col": cell.col, "label": cell.label, **cell.params,
               "status": "ok", **cell_metrics(merge.family, merge.jobs, merge.results),
               "lora": "", "image": "", "error": ""}
        if not args.metrics_only:
            path = files.path(cell, "safetensors")
            write_cell(path, sweep, merge, overwrite=files.replace)
            row["lora"] = files.relative(path)
        if images is not None:
            path = files.write_bytes(files.path(cell, "png"), images.png(merge))
            row["image"] = files.relative(path)
        files.save_cell(cell, row, sweep_id, (state.process_index, state.num_processes))
        return row

    rows, skipped = run_cells(mine, work, finished, state=state, debug=args.debug, bar=bar)
    failed = [r for r in rows if r["status"] != "ok"]
    titles: list[str] = []
    if state.is_main_process:
        for row in rows:
            print("  " + cell_line(row))
        print(f"{len(rows)} cell(s): {len(rows) - len(failed)} ok, {len(failed)} failed"
              + (f", {skipped} finished earlier (--resume)" if skipped else ""))
        if gather:
            titles = write_summary(files, rows, x, y, images is not None)
            print(f"wrote {', '.join(files.summary_path(n) for n in names)}")
        else:
            print(f"shard {args.shard[0]}/{args.shard[1]} done; gather every shard with --resume and no --shard")
    state.wait_for_everyone()
    if failed:
        first = failed[0]
        raise LoraToolsError(f"{len(failed)} of {len(rows)} cell(s) failed (cell {first['index']} "
                             f"{first['label']}: {first['error']}); the others were written")
    return {"rows": rows, "folder": files.folder, "skipped": skipped, "sheet_titles": titles}


def write_summary(files: GridFiles, rows: list[dict], x: Axis | None, y: Axis | None, with_sheet: bool) -> list[str]:
    """grid.csv, grid.json, grid.png (and sheet.png); returns the contact sheet's cell titles."""
    from library.grid.sheet import contact_sheet, metrics_figure
    from library.plots import png_bytes

    axis_names = [a.name for a in (x, y) if a is not None]
    files.write_bytes(files.summary_path("grid.csv"), csv_text(rows, axis_names).encode())
    axes = {k: {"name": a.name, "values": list(a.values)} for k, a in (("x", x), ("y", y)) if a is not None}
    files.write_bytes(files.summary_path("grid.json"), json.dumps({"axes": axes, "cells": rows}, indent=1).encode())
    files.write_bytes(files.summary_path("grid.png"), png_bytes(metrics_figure(rows, x, y), tight=True))
    if with_sheet:
        from PIL import Image

        tiles = {r["index"]: Image.open(files.summary_path(r["image"])).convert("RGB") for r in rows if r.get("image")}
        labels = {r["index"]: r["label"] for r in rows}
        fig, titles = contact_sheet(tiles, labels, len(y.values) if y else 1, len(x.values) if x else 1)
        files.write_bytes(files.summary_path("sheet.png"), png_bytes(fig, tight=True))
        return titles
    return []


