"""One cell of a sweep, run through svd_merge_lora.py's own machinery (library.svd_merge, svd_merge_io and the
low-rank engine behind them): the cell's ratios and settings replace the run's, the inputs are read once for
the whole sweep, and the cell's LoRA goes through the one LoRA writer (svd_merge_io.write_merged)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from library.errors import LoraToolsError
from library.grid.spec import Cell, cell_ratios, cell_settings
from library.lora_combine import Group, group_targets
from library.merge_plan import LoraInput
from library.svd_merge import LayerJob, LayerResult, MergeSettings, merge_layers, uses_factored_route
from library.svd_merge_io import jobs_from_groups, summary, write_merged


@dataclass
class Sweep:
    """What every cell shares: the inputs (read once, at the --ratios strengths), the settings from the
    flags, the output format, and the parsed flags (save precision, metadata, provenance)."""

    inputs: list[LoraInput]
    settings: MergeSettings
    fmt: str
    args: argparse.Namespace


@dataclass
class CellMerge:
    inputs: list[LoraInput]
    settings: MergeSettings
    family: str
    groups: list[Group]
    jobs: list[LayerJob]
    results: dict[str, LayerResult]


def merge_cell(sweep: Sweep, cell: Cell) -> CellMerge:
    ratios = cell_ratios([i.ratio for i in sweep.inputs], cell.params)
    inputs = [dataclasses.replace(inp, ratio=r) for inp, r in zip(sweep.inputs, ratios, strict=True)]
    settings = cell_settings(sweep.settings, cell.params)
    family, groups = group_targets(inputs)
    if not groups:
        raise LoraToolsError("nothing to merge: every module has strength 0")
    jobs = jobs_from_groups(groups, len(inputs))
    return CellMerge(inputs, settings, family, groups, jobs, merge_layers(jobs, settings))


def write_cell(path: str, sweep: Sweep, merge: CellMerge, overwrite: bool) -> None:
    args, settings = sweep.args, merge.settings
    factored = sum(uses_factored_route(j, settings) for j in merge.jobs)
    write_merged(path, merge.groups, merge.results, summary(merge.results), merge.inputs, merge.family, sweep.fmt,
                 mode=settings.mode, seed=settings.seed, randomized_svd=factored < len(merge.jobs),
                 save_precision=args.save_precision, report=None, report_extra={}, args=args,
                 minimal=args.no_metadata, overwrite=overwrite, script="merge_grid.py")
