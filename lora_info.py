#!/usr/bin/env python
"""Inspect a LoRA file: format, model family, modules with rank, alpha and delta norm, dtypes, metadata, tags;
with --plot, bar charts of the delta's norm, rank and alpha per block and per layer."""

from __future__ import annotations

import argparse
import json
import sys

from library.cli import add_common_args, run_cli, warn
from library.errors import LoraToolsError


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", help="LoRA files (.safetensors, or pickled .pt/.ckpt/.bin)")
    parser.add_argument("--family", default=None, help="model family, when detection cannot tell (sd1, sd2, sdxl, flux1, ...)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (one object, or a list for several "
                        "files), every field included: all tags, per-module and per-block norms")
    parser.add_argument("--tags", action="store_true", help="list every training tag (ss_tag_frequency, else the "
                        "ss_dataset_dirs folder words), most frequent first")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="write per-block and per-layer bar charts of "
                        "‖ΔW‖_F, rank and alpha to this PNG (one file at a time; needs matplotlib)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot file (never an input)")
    add_common_args(parser, writes=False, device=False, precision=False)
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    from library.diffusers_compat import kohya_alpha_warning
    from library.lora_summary import format_text, plot_summary, summarize  # torch: imported when work starts

    plot = _plot_destination(args)
    reports = [summarize(path, args.family) for path in args.files]
    for report in (r for r in reports if "module_list" in r):
        pairs = [(m["rank"], m["alpha"]) for m in report["module_list"]]
        if note := kohya_alpha_warning(report["format"], report["family"], pairs):
            report["warnings"] = [*report.get("warnings", []), note]
            warn(f"{report['file']}: {note}")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, default=str))
    else:
        print("\n\n".join(format_text(r, args.verbose, args.tags) for r in reports))
    if plot is not None and "error" not in reports[0]:
        written = plot_summary(reports[0], plot)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    failed = [r for r in reports if "error" in r]
    if failed:
        # The report above already explains each file; the exit status tells pipelines it failed.
        raise LoraToolsError(f"{len(failed)} of {len(reports)} file(s) could not be interpreted", file=failed[0]["file"])
    return reports


def _plot_destination(args: argparse.Namespace):
    """The checked --plot destination (before any file is read), or None; matplotlib checked first too."""
    if args.plot is None:
        return None
    from library.plots import checked_png

    if len(args.files) != 1:
        raise LoraToolsError(f"--plot takes one LoRA file, {len(args.files)} were given")
    return checked_png(args.plot, args.files, args.overwrite)


if __name__ == "__main__":
    run_cli(setup_parser, main)
