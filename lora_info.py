#!/usr/bin/env python
"""Inspect a LoRA file: format, model family, modules with rank and alpha, dtypes, metadata, top tags."""

from __future__ import annotations

import argparse
import json

from library.cli import add_common_args, run_cli, warn
from library.errors import LoraToolsError


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", help="LoRA files (.safetensors, or pickled .pt/.ckpt/.bin)")
    parser.add_argument("--family", default=None, help="model family, when detection cannot tell (sd1, sd2, sdxl, flux1, ...)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (one object, or a list for several files)")
    add_common_args(parser, writes=False, device=False, precision=False)
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    from library.diffusers_compat import kohya_alpha_warning
    from library.lora_summary import format_text, summarize  # torch: imported when work starts, not for --help

    reports = [summarize(path, args.family) for path in args.files]
    for report in (r for r in reports if "module_list" in r):
        pairs = [(m["rank"], m["alpha"]) for m in report["module_list"]]
        if note := kohya_alpha_warning(report["format"], report["family"], pairs):
            report["warnings"] = [*report.get("warnings", []), note]
            warn(f"{report['file']}: {note}")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, default=str))
    else:
        print("\n\n".join(format_text(r, args.verbose) for r in reports))
    failed = [r for r in reports if "error" in r]
    if failed:
        # The report above already explains each file; the exit status tells pipelines it failed.
        raise LoraToolsError(f"{len(failed)} of {len(reports)} file(s) could not be interpreted", file=failed[0]["file"])
    return reports


if __name__ == "__main__":
    run_cli(setup_parser, main)
