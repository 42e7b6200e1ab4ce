"""Merge two or more checkpoints of one family, streaming one key of every input at a time.

    python merge_models.py --models a.safetensors b.safetensors --ratios 0.6 0.4 --save_to ab.safetensors
    python merge_models.py --models a.safetensors b.safetensors --base sd15.safetensors --method dare_ties \\
        --density 0.3 --seed 7 --block_weights "0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1" \\
        --save_recipe ab.toml --save_to ab.safetensors
    python merge_models.py --recipe ab.toml --save_to ab-again.safetensors      # bit-exact replay

Ratios follow sd-scripts' merge_models: ONE RATIO PER MODEL, the weight of that model's contribution
(0: the model adds nothing). With models A, B, … and --base C:
  weighted_sum      Σ rᵢ·Mᵢ (default 1/n each)      add_difference   C + Σ rᵢ(Mᵢ − C): ratios 1 r = A + r(B − C)
  task_arithmetic   as add_difference; without --base, C = A (A's ratio then has no effect)
  ties, dare_linear, dare_ties, magnitude_prune   C + merge of the task vectors Mᵢ − C (C = A without --base)
  slerp             A → B at t = r_B / (r_A + r_B) (default 0.5 0.5)
Per-key strengths (--block_weights, --key_weights, --te_ratio) then give W = A + s·(merge − A): s = 0 keeps
A, s = 1 is the full merge (DareMerge's gradients mean the opposite: there 1 keeps A). "CLIP merge" is
--only te. Keys only some models have are copied from the first that has them, markers (v_pred, ztsnr,
edm_*) are kept, and every copied key is counted (listed with -v).
"""

from __future__ import annotations

import argparse
import os
import sys

from library.cli import add_common_args, density, finite_float, prepare_output, progress, run_cli
from library.methods import SIGN_METHODS

METHODS = ("weighted_sum", "add_difference", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
           "slerp")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="checkpoints (.safetensors, sharded folders, .ckpt); A first")
    parser.add_argument("--ratios", nargs="+", type=finite_float, default=None,
                        help="one ratio per model, the weight of its contribution (default: see the methods above)")
    parser.add_argument("--base", default=None, help="base model C of add_difference, task vectors and --protect_a")
    parser.add_argument("--method", default="weighted_sum", choices=METHODS, help="merge method (default weighted_sum)")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--block_weights", default=None,
                        help="MBW: one strength per block (SD1.x 25 or 26 with BASE first, SDXL 19/20, Flux 57/59/61, SD3 "
                             "joint blocks, ±BASE), comma list or JSON list; keys outside the blocks keep 1")
    parser.add_argument("--key_weights", nargs="+", default=None, metavar="GLOB=VALUE",
                        help="strength of keys matching a glob (matched against the key's end: 'attn*=0.3'); last match wins")
    parser.add_argument("--te_ratio", type=finite_float, default=None, help="strength of every text-encoder key")
    parser.add_argument("--only", choices=("unet", "te"), default=None,
                        help="merge only the UNet/transformer or only the text encoders (CLIP merge); the rest is A's")
    parser.add_argument("--mask", default=None,
                        help="mask file (make_mask.py): where it is False, and in keys it lacks, A is kept")
    parser.add_argument("--normalize", choices=("layer", "attn_only"), default=None,
                        help="scale B…'s tensors to A's norms before merging: every tensor (layer), or attention Q ×s and "
                             "K ÷s so that QKᵀ is unchanged (attn_only)")
    parser.add_argument("--density", type=density, default=1.0, help="ties/dare/magnitude_prune: share kept (0…1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks (drawn per key)")
    parser.add_argument("--majority_sign_method", default="total", choices=(*SIGN_METHODS, "off"),
                        help="ties/dare_ties sign election; off = no election (default total)")
    parser.add_argument("--no_rescale", action="store_true", help="DARE without the 1/density rescale (DareMerge's default)")
    parser.add_argument("--protect_a", type=density, default=0.0, metavar="SHARE",
                        help="keep A's value where |A − base| is in A's largest SHARE per tensor (DareMerge's protection)")
    parser.add_argument("--family", default=None, help="model family when detection fails or is ambiguous")
    parser.add_argument("--save_recipe", default=None, help="write a toml recipe that --recipe replays bit for bit")
    parser.add_argument("--recipe", default=None, help="replay a recipe (give --save_to and common flags only)")
    add_common_args(parser)
    precision = parser._option_string_actions["--precision"]
    precision.choices = [*precision.choices, "fp64"]  # float64 sums, for exact checks
    return parser


def main(args: argparse.Namespace) -> dict:
    from library.cli import compute_dtype, resolve_device
    from library.console import warn
    from library.destination import Destination, write_bytes
    from library.errors import LoraToolsError
    from library.metadata import checkpoint_metadata
    from library.methods import method as registry_method
    from library.model_merge import MergeSettings, default_ratios
    from library.model_merge_io import MergeInputs, run_merge
    from library.model_merge_plan import build_plan
    from library.model_setup import detect_places, strengths_from_args
    from library.precision import parse_dtype
    from library.recipe import RECIPE_KEY, apply_recipe, check_inputs, check_setup, placeholder_hashes, recipe_text
    from library.safetensors_io import StreamingWriter

    recipe = apply_recipe(args, vars(setup_parser().parse_args([])), args.recipe) if args.recipe else None
    if not args.models or len(args.models) < 2:
        raise LoraToolsError("--models needs two or more checkpoints")
    device = resolve_device(args.device)
    paths = [*args.models, *([args.base] if args.base else []), *([args.mask] if args.mask else [])]
    save_to = prepare_output(args.save_to, paths, args)
    recipe_out = Destination(args.save_recipe, paths, args.overwrite, flag="--save_recipe",
                             other_outputs={"--save_to": save_to}) if args.save_recipe else None
    if recipe_out is not None:
        recipe_out.check()
    name = registry_method(args.method).name
    settings = MergeSettings(name, tuple(args.ratios or default_ratios(name, len(args.models))), args.density, args.seed,
                             args.majority_sign_method, not args.no_rescale, args.protect_a, args.base is not None)
    settings.check(len(args.models))
    args.ratios = list(settings.ratios)  # the recipe and provenance record the ratios used, defaults included
    args.models = [os.path.abspath(p) for p in args.models]
    args.base, args.mask = (os.path.abspath(p) if p else None for p in (args.base, args.mask))
    with MergeInputs(args.models, args.base, args.mask) as inputs:
        places, family = detect_places(inputs.models[0], args.family, args.models[0])
        strengths = strengths_from_args(args, places, family)
        plan = build_plan(inputs.models, inputs.base, strengths, uses_base=args.base is not None,
                          save_dtype=parse_dtype(args.save_precision), paths=args.models, mask=inputs.mask)
        reasons = ", ".join(f"{n} {why}" for why, n in plan.reasons().items())
        print(f"{len(args.models)} {family or 'unknown-family'} models, {args.method}: {len(plan.merged)} keys merged"
              + (f", copied: {reasons}" if reasons else ""))
        if args.verbose:
            for k in plan.keys:
                print(f"  {'merge' if k.merge else 'copy '} {k.key}" + (f" (s={k.strength:g})" if k.merge else f" ({k.why})"))
        if args.dry_run:
            return {"plan": plan}
        files = inputs.files() + ([args.mask] if args.mask else [])
        if recipe is not None:
            check_setup(recipe, files, device.type, args.recipe)  # the hashes: once the merge has read the inputs

        def metadata(hashes: dict[str, str]) -> tuple[str, dict[str, str]]:
            text = recipe_text(args, device.type, hashes)
            return text, checkpoint_metadata(inputs.models[0].metadata, script="merge_models.py", args=args,
                                             inputs=list(hashes), hashes=hashes, extra={RECIPE_KEY: text},
                                             seed=args.seed if name.startswith("dare") else None)
        text, meta = metadata(placeholder_hashes(files))  # same length as the real ones, patched at the end
        specs = {k.key: (k.dtype, k.shape) for k in plan.keys}
        bar = progress(range(len(plan.keys)), desc="merge", total=len(plan.keys), enabled=sys.stderr.isatty())
        with StreamingWriter(save_to, specs, meta, inputs=paths, overwrite=args.overwrite) as writer, \
                inputs.hash_while_reading(files) as hasher:
            rounding = run_merge(inputs, plan, settings, writer, compute=compute_dtype(args), device=device,
                                 normalize=args.normalize, on_key=lambda: bar.update(1),
                                 measure_all=bool(args.verbose))
            hashes = hasher.digests()  # the inputs hashed from the bytes the merge read, on a second thread
            if recipe is not None:
                check_inputs(recipe, hashes, device.type, args.recipe)  # before the output is renamed into place
            text, meta = metadata(hashes)
            writer.update_metadata(meta)
        bar.close()
    if recipe_out is not None:
        write_bytes(recipe_out, text.encode("utf-8"))
    line = rounding.line()
    if line:
        (warn if rounding.clamped else print)(line)
    print(f"wrote {save_to} ({os.path.getsize(save_to)} bytes)")
    return {"plan": plan, "rounding": rounding, "recipe": text}


if __name__ == "__main__":
    sys.exit(run_cli(setup_parser, main))
