"""Bake LoRAs into a checkpoint at chosen strengths, or combine LoRAs into one LoRA file.

    python merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors --ratios 0.8 -0.5 \\
        --save_to merged.safetensors
    python merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors
    python merge_lora.py --models a.safetensors b.safetensors --mode ties --density 0.5 --save_to ab.safetensors

Replaces sd-scripts' merge_lora.py and sdxl_merge_lora.py (same flags, same meaning) and the "apply" and
"merge" nodes of the ComfyUI LoRA mergers.

Into a checkpoint (--sd_model): any LoRA format and adapter type loratools reads (LoRA/LoCon/Tucker,
LoHa, LoKr, DoRA, full diffs), including LoRAs on fused weights (OpenCLIP in_proj q/k/v rows, Flux qkv).
The checkpoint streams through tensor by tensor (memory stays far below its size); weights no LoRA
touches are copied bit for bit and the checkpoint's metadata is kept. The family is detected from the
checkpoint (--sdxl/--v2 are accepted and checked). The plan — which LoRA module changes which weight —
is printed first; a module that matches no weight is an error unless --allow_unmatched.

LoRAs into one LoRA (no --sd_model), --mode:
  concat           exact, the result applies Σ ratioᵢ·ΔWᵢ (default); rank = SUM of the inputs' ranks (2 × rank 16 →
                   32, twice the size). sd-scripts' same-rank LoRA: --mode add, or svd_merge_lora.py --new_rank N.
  add              factor-wise weighted sum (sd-scripts' default): APPROXIMATE — the product has cross
                   terms upᵢ·downⱼ; equal ranks required; -v prints the relative error per layer.
                   Unlike sd-scripts, one LoRA merged alone keeps its strength r (sd-scripts gives r·|r|).
  ties, dare_linear, dare_ties, magnitude_prune
                   ComfyUI Power-Merge / PEFT factor-space modes (masks on up and down separately, DARE
                   rescaled by 1/density, seeded per layer): APPROXIMATE as well. svd_merge_lora.py has
                   the delta-space versions, which are what these methods are defined on.
--shuffle mixes the ranks with a seeded random orthogonal matrix (the product is unchanged).
"""

from __future__ import annotations

import argparse
import os

from library.cli import (
    add_common_args,
    add_lora_merge_args,
    compute_dtype,
    finite_float,
    prepare_output,
    progress,
    ratio_value,
    resolve_device,
    run_cli,
)
from library.errors import LoraToolsError
from library.formats.specs import WRITE_FORMATS
from library.methods import FACTOR, method_params, mode_choices, recorded_seed

# Torch and the maths are imported inside the functions that do the work, so that --help stays fast.


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd_model", default=None,
                        help="checkpoint to merge into (.safetensors, .ckpt, or a diffusers shard folder); "
                             "without it the LoRAs are merged into one LoRA")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files (any format loratools reads)")
    parser.add_argument("--ratios", nargs="*", type=ratio_value, default=None,
                        help="strength per model (negative allowed, nan/inf refused; default 1 each), or auto")
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="block weights per model: a webui lora-block-weight string (17/26 values SD1/SD2, "
                             "12/20 SDXL, 61 Flux), a JSON list (sd-scripts) or a preset name (ALL, INS, IND, "
                             "INALL, MIDD, OUTD, OUTS, OUTALL, NONE, ALL0.5, FLUXALL or your own); '-' for none")
    parser.add_argument("--lbw_presets", default=None, help="toml (NAME = \"1,0,…\") or webui lbwpresets.txt file")
    parser.add_argument("--lbw_x", type=finite_float, default=1.0, help="value of X in block-weight strings (default 1)")
    parser.add_argument("--mode", default=None, choices=mode_choices(FACTOR),
                        help="LoRA+LoRA merge mode (default concat: exact, rank = Σ ranks); see above")
    add_lora_merge_args(parser)
    parser.add_argument("--format", default=None, choices=WRITE_FORMATS,
                        help="output LoRA format (default: that of the first input)")
    parser.add_argument("--allow_unmatched", action="store_true",
                        help="skip LoRA modules that match no weight instead of stopping")
    parser.add_argument("--family", default=None,
                        help="model family (sd1, sd2, sdxl, flux1) when detection is ambiguous or the checkpoint "
                             "holds only part of a model")
    parser.add_argument("--no_metadata", action="store_true",
                        help="checkpoint: write no metadata; LoRA: only the keys a loader needs")
    parser.add_argument("--v2", action="store_true", help="accepted for sd-scripts compatibility: checks for SD2.x")
    parser.add_argument("--sdxl", action="store_true", help="accepted for sd-scripts compatibility: checks for SDXL")
    add_common_args(parser)
    return parser


def merge_into_checkpoint(args: argparse.Namespace, block_weights) -> dict:
    from library.checkpoint_apply import apply_plan
    from library.inputs import lora_inputs
    from library.merge_plan import build_plan, choose_layout
    from library.merge_report import print_bake_plan, print_report
    from library.metadata import checkpoint_metadata
    from library.safetensors_io import open_checkpoint, parse_dtype

    save_to = prepare_output(args.save_to, [args.sd_model, *args.models], args)
    with open_checkpoint(args.sd_model) as reader:
        layout = choose_layout(reader, args.sd_model, args.family, args.sdxl, args.v2)
        inputs = lora_inputs(args.models, args.ratios, block_weights, family=layout.family.name,
                             allow_unmatched=args.allow_unmatched, family_from="checkpoint")
        plan = build_plan(reader, layout, inputs, allow_unmatched=args.allow_unmatched)
        print_bake_plan(args.sd_model, layout, plan, args.verbose, args.dry_run)
        if args.dry_run:
            return {"plan": plan}
        metadata = None if args.no_metadata else checkpoint_metadata(
            getattr(reader, "metadata", {}), script="merge_lora.py", args=args, inputs=args.models,
            seed=recorded_seed(args.seed, block_weights=block_weights),  # only R/U block weights draw here
            extra={"loratools.base_model": os.path.basename(args.sd_model)})
        result = apply_plan(reader, plan, save_to, metadata=metadata, compute_dtype=compute_dtype(args),
                            save_dtype=parse_dtype(args.save_precision) if args.save_precision else None,
                            device=resolve_device(args.device), inputs=[args.sd_model, *args.models],
                            overwrite=args.overwrite, measure=True if args.verbose else None,
                            progress=lambda keys: progress(keys, desc="merge"))
    print_report(save_to, result, args.verbose, args.save_precision)
    return {"plan": plan, "result": result, "save_to": save_to}


def merge_loras(args: argparse.Namespace, block_weights) -> dict:
    from library.inputs import lora_inputs
    from library.lora_merge import MergeOptions, merge_and_write, plan_lora_merge
    from library.merge_report import print_lora_merge

    save_to = prepare_output(args.save_to, args.models, args)
    inputs = lora_inputs(args.models, args.ratios, block_weights, family=args.family,
                         allow_unmatched=args.allow_unmatched)
    options = MergeOptions(args.density, args.majority_sign_method, args.seed, args.shuffle, params=method_params(args))
    plan = plan_lora_merge(inputs, args.mode or "concat", args.format, save_to, options)  # --concat: checked in main
    merged = merge_and_write(plan, describe=lambda m: print_lora_merge(plan, m, args.verbose), script="merge_lora.py",
                             args=args, save_precision=args.save_precision, dry_run=args.dry_run, overwrite=args.overwrite,
                             no_metadata=args.no_metadata, default_mode=args.mode is None and not args.concat)
    if merged is None:  # --dry_run
        return {"plan": plan}
    return {"plan": plan, "modules": merged.modules, "reports": merged.reports, "save_to": save_to}


def main(args: argparse.Namespace) -> dict:
    from library.block_weights import block_weights_for_models
    from library.checkpoint_apply import one_thread
    from library.inputs import ratios_for

    ratios_for(args.ratios, args.models)  # counts checked before anything is read
    if not args.sd_model and args.mode not in (None, "concat") and args.concat:
        raise LoraToolsError(f"--concat contradicts --mode {args.mode}")
    block_weights = block_weights_for_models(args.lbws, len(args.models), presets_file=args.lbw_presets,
                                             seed=args.seed, x=args.lbw_x)
    with one_thread(resolve_device(args.device).type == "cpu"):
        return (merge_into_checkpoint if args.sd_model else merge_loras)(args, block_weights)


if __name__ == "__main__":
    run_cli(setup_parser, main)
