"""Sweep a LoRA merge over a grid of settings and see what each cell does.

    python merge_grid.py --models a.safetensors b.safetensors --x 'ratio_a=0:1:5' --y 'ratio_b=0:1:5' --save_to grid/
    python merge_grid.py --models a.safetensors b.safetensors --x 'mode=ties,dare_ties' --y 'density=0.25,0.5,1' \
        --new_rank 32 --metrics_only --save_to grid/
    accelerate launch merge_grid.py --recipe sweep.toml --base_model sd15-diffusers/ --prompts 'a cat' --save_to grid/

Every cell is one svd_merge_lora.py merge (same flags, same engine) with the cell's values of the swept
parameters (ratio_a, ratio_b, …, mode, density, rank, conv_rank, seed, sign_method, dynamic_param, …): its
LoRA (unless --metrics_only), its figures against the exact merge Σ ratioᵢ·ΔWᵢ (relative error, retained
energy, cosine, norm per block), one CSV/JSON row and a PNG grid of the figures; with --base_model (diffusers
installed) one image per cell from one loaded pipeline and a labelled contact sheet. A failing cell is
reported and the sweep goes on; --resume skips finished cells; `accelerate launch` splits the cells over
processes, --shard i/N over batch jobs.
"""

from __future__ import annotations

import argparse
import sys

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import add_common_args, add_svd_merge_args, finite_float, positive_int, run_cli
from library.grid.runner import shard_spec


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="LoRA files (any format loratools reads)")
    parser.add_argument("--ratios", nargs="*", type=finite_float, default=None,
                        help="strength per model where the grid does not set it (default 1 each)")
    parser.add_argument("--x", default=None, help="columns: NAME=V1,V2,… or NAME=START:STOP:COUNT "
                                                  "(e.g. 'ratio_a=0,0.25,0.5,0.75,1', 'rank=4:64:4')")
    parser.add_argument("--y", default=None, help="rows, same syntax (e.g. 'mode=ties,dare_ties')")
    parser.add_argument("--recipe", default=None, help="toml with x, y, models and any merge flag (new_rank = 16); "
                                                       "the command line wins")
    parser.add_argument("--save_to", default=None, help="output folder: cells/, grid.csv, grid.json, grid.png")
    parser.add_argument("--metrics_only", action="store_true", help="write the figures, not the cells' LoRAs")
    parser.add_argument("--resume", action="store_true", help="skip cells already finished in --save_to")
    parser.add_argument("--shard", type=shard_spec, default=None,
                        help="i/N: run only every N-th cell from the i-th (batch arrays); gather with --resume")
    add_svd_merge_args(parser)
    images = parser.add_argument_group("images (optional: diffusers installed)")
    images.add_argument("--base_model", default=None, help="diffusers pipeline folder: one image per cell")
    images.add_argument("--prompts", nargs="+", default=None, help="prompt(s) rendered for every cell")
    images.add_argument("--steps", type=positive_int, default=20, help="sampling steps (default 20)")
    images.add_argument("--size", type=positive_int, default=None, help="image side in pixels (default: the model's)")
    images.add_argument("--guidance", type=finite_float, default=7.0, help="guidance scale (default 7)")
    add_common_args(parser, save_default="that of the inputs")
    return parser


def main(args: argparse.Namespace) -> dict:
    from library.errors import LoraToolsError
    from library.grid.spec import apply_recipe, grid_cells, parse_axis
    from library.grid.sweep import check_values, run_sweep

    x = y = None
    if args.recipe:
        x, y = apply_recipe(args, setup_parser(), args.recipe)
    if not args.models:
        raise LoraToolsError("--models: required (or `models = [...]` in --recipe)")
    if args.x:
        x = parse_axis(args.x, "--x", len(args.models))
    if args.y:
        y = parse_axis(args.y, "--y", len(args.models))
    if args.save_to is None and not args.dry_run:
        raise LoraToolsError("--save_to is required (a folder)")
    if (args.base_model is None) != (args.prompts is None):
        raise LoraToolsError("--base_model and --prompts go together (the image path needs both)")
    cells = grid_cells(x, y)
    settings = check_values(args, cells)
    if args.dry_run:
        for cell in cells:
            print(f"cell {cell.index}: {cell.label}")
        print(f"{len(cells)} cell(s); nothing written (--dry_run)")
        return {"cells": cells}
    return run_sweep(args, settings, cells, x, y, bar=sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(run_cli(setup_parser, main))
