"""Extract a LoRA from the difference of two checkpoints (tuned − base), one layer at a time.

Replaces sd-scripts' extract_lora_from_models.py and flux_extract_lora.py (same flags) and ComfyUI's
"Extract and Save Lora" node (--lora_type, --bias_diff, --rank, --prefix_model, --prefix_lora).

    python extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --dim 64 --conv_dim 32 --save_to diff.safetensors -v --report diff.json
"""

from __future__ import annotations

import argparse

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import add_common_args, finite_float, nonnegative_int, positive_int, prepare_output, progress, run_cli, warn
from library.extract.styles import OUTPUT_FORMATS
from library.lowrank_rules import DYNAMIC_METHODS, check_dynamic_flags, check_quantile

SCRIPT = "extract_lora_from_models.py"


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_org", required=True, help="base checkpoint (.safetensors, or .ckpt loaded safely)")
    p.add_argument("--model_tuned", required=True, help="fine-tuned checkpoint; the LoRA is tuned − base")
    p.add_argument("--save_to", help="output LoRA (.safetensors)")
    p.add_argument("--dim", "--rank", dest="dim", type=positive_int, default=4,
                   help="rank of Linear and 1x1 conv layers; the cap of --dynamic_method (default 4; --rank as ComfyUI)")
    p.add_argument("--conv_dim", type=positive_int, default=None,
                   help="rank of 3x3 (k×k) convs; without it they are not extracted (sd-scripts' default)")
    p.add_argument("--lora_type", choices=("standard", "full_diff"), default="standard",
                   help="standard: low-rank pairs; full_diff: every weight's whole difference as `diff`")
    p.add_argument("--bias_diff", action="store_true", help="also store bias (`diff_b`) and 1-D norm weight differences")
    p.add_argument("--prefix_model", default="",
                   help="extract only keys starting with this (e.g. model.diffusion_model.); default all keys")
    p.add_argument("--prefix_lora", default=None,
                   help="prefix of the output module names in place of --prefix_model (comfy/peft formats)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="output naming: the detected family's kohya names by default; peft for a model of no known "
                        "family; comfy for ComfyUI's `diffusion_model.` names")
    p.add_argument("--family", default=None, help="model family, when detection from the checkpoint is not wanted")
    p.add_argument("--v2", action="store_true", help="SD2.x checkpoints (checked against detection)")
    p.add_argument("--sdxl", action="store_true", help="SDXL checkpoints (checked against detection)")
    p.add_argument("--v_parameterization", action="store_true", help="accepted for compatibility (metadata only)")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                   help="choose each layer's rank by its singular values (resize_lora's rules), capped by --dim")
    p.add_argument("--dynamic_param", type=finite_float, default=None,
                   help="parameter of --dynamic_method: ≥ 1 for sv_ratio, in (0, 1] for sv_fro and sv_cumulative")
    p.add_argument("--min_diff", type=finite_float, default=0.0,
                   help="skip (and list) each layer whose largest |difference| is below this. Applied per layer, "
                        "unlike sd-scripts which used it once for the whole text encoder (default 0)")
    p.add_argument("--clamp_quantile", type=finite_float, default=None,
                   help="clamp the factors to this quantile of their values, as sd-scripts did by default (0.99); "
                        "off unless given, because the clamp only adds error")
    p.add_argument("--exact_svd", action="store_true", help="exact SVD per layer instead of the randomized one")
    p.add_argument("--svd_iters", type=nonnegative_int, default=2, help="most power iterations of the randomized SVD (default 2)")
    p.add_argument("--svd_tol", type=finite_float, default=1e-3,
                   help="stop the power iterations early once one improved a layer's error² by at most this share "
                        "of it (default 0.001, error within 1.01x of the exact SVD's; 0: always --svd_iters)")
    p.add_argument("--oversample", type=nonnegative_int, default=None,
                   help="extra columns of the randomized sketch (default: the rank itself, at least 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD's sketches (per layer)")
    p.add_argument("--load_precision", choices=("float", "fp32", "fp16", "bf16"), help="cast both models before subtracting")
    p.add_argument("--load_original_model_to", help="device the base model's tensors are read to (sd-scripts' flag; default cpu)")
    p.add_argument("--load_tuned_model_to", help="device the tuned model's tensors are read to (sd-scripts' flag; default cpu)")
    p.add_argument("--mem_eff_safe_open", action="store_true", help="accepted: tensors are always read one by one, no mmap")
    p.add_argument("--mmap", action="store_true", help="read tensors through safetensors' mmap instead")
    p.add_argument("--no_metadata", action="store_true",
                   help="write only what loaders need (dims, module type, PEFT config), no modelspec/provenance")
    p.add_argument("--report", default=None, help="write per-layer ranks, retained energy and errors as JSON here")
    add_common_args(p, precision=False, save_default="fp32, as sd-scripts")
    return p


def options_from_args(args: argparse.Namespace):
    from library.cli import resolve_device
    from library.errors import LoraToolsError
    from library.extract.layers import ExtractOptions
    from library.safetensors_io import parse_dtype

    check_dynamic_flags(args.dynamic_method, args.dynamic_param)
    check_quantile(args.clamp_quantile)
    for flag, value in (("--min_diff", args.min_diff), ("--svd_tol", args.svd_tol)):
        if value < 0:
            raise LoraToolsError(f"{flag}: value {value:g} must be 0 or more")
    if args.v2 and args.sdxl:
        raise LoraToolsError("--v2 and --sdxl cannot both be given")
    return ExtractOptions(
        lora_type=args.lora_type, dim=args.dim, conv_dim=args.conv_dim, dynamic_method=args.dynamic_method,
        dynamic_param=args.dynamic_param, bias_diff=args.bias_diff, min_diff=args.min_diff, exact_svd=args.exact_svd,
        svd_iters=args.svd_iters, svd_tol=args.svd_tol or None, oversample=args.oversample, clamp_quantile=args.clamp_quantile,
        device=resolve_device(args.device), load_dtype=parse_dtype(args.load_precision),
        save_dtype=parse_dtype(args.save_precision) or parse_dtype("fp32"), seed=args.seed)


def main(args: argparse.Namespace) -> dict:
    from library.errors import LoraToolsError
    from library.extract.layers import plan_layers, run_extraction
    from library.extract.output import NamingOptions, choose_naming, output_tensors_and_metadata
    from library.extract.pairs import CheckpointPair, hash_in_background
    from library.extract.report import build_report, format_plan, format_run, write_report
    from library.lora_output import write_named_tensors
    from library.stage_clock import StageClock, stage

    options = options_from_args(args)
    clock = StageClock().start() if args.verbose else None  # the -v profile: time per stage of the whole run
    inputs = [args.model_org, args.model_tuned]
    save_to = prepare_output(args.save_to, inputs, args)
    with CheckpointPair(args.model_org, args.model_tuned, mmap=args.mmap,
                        devices=(args.load_original_model_to, args.load_tuned_model_to)) as pair:
        match = pair.match(args.prefix_model)
        naming = choose_naming(pair, NamingOptions(format=args.format, family=args.family, prefix_model=args.prefix_model,
                                                   prefix_lora=args.prefix_lora, v2=args.v2, sdxl=args.sdxl))
        naming.prepare(match.common)
        tasks, skipped = plan_layers(pair, [k for k in match.common if naming.accepts(k)], options, naming.targets_of)
        skipped += naming.rejected(match.common)
        if not tasks:
            raise LoraToolsError("nothing to extract: " + ("; ".join(sorted({why for _, why in skipped})) or "no keys"),
                                 file=args.model_tuned)
        if args.dry_run:
            print("\n".join(format_plan(tasks, skipped, naming.describe())))
            return {"tasks": tasks, "skipped": skipped}
        files = pair.files()  # their provenance sha256 is computed on another thread during the extraction:
        hashing = None if args.no_metadata else hash_in_background(files)
        bar = (lambda it, n: progress(it, desc="extracting", total=n)) if not args.debug else None
        results = run_extraction(pair, tasks, options, bar)
    settings = {k: v for k, v in vars(args).items() if k not in ("debug", "config_file")}
    report = build_report(results, skipped, only_base=match.only_base, only_tuned=match.only_tuned, settings=settings)
    kept = [r for r in results if not r.skipped]
    if not kept:
        raise LoraToolsError("every selected layer is identical in both models (or below --min_diff); nothing to save",
                             file=args.model_tuned)
    tensors, metadata = output_tensors_and_metadata(kept, naming, options, save_to, v_parameterization=args.v_parameterization)
    with stage("hashing the inputs (waiting for it)"):
        _ = hashing and hashing.join()
    with stage("writing"):  # alpha in the save dtype, as sd-scripts: the rank, rounded by the engine to that dtype
        write_named_tensors(save_to, tensors, metadata, dtype=options.save_dtype, alpha_dtype=options.save_dtype,
                            script=SCRIPT, args=args, inputs=inputs, hashed=files, seed=args.seed,
                            minimal=args.no_metadata, overwrite=args.overwrite)
    print("\n".join(format_run(report, clock=clock and clock.stop())))
    print(f"saved {len(tensors)} tensors ({naming.describe()}) to {save_to}")
    if args.report:
        write_report(args.report, report, inputs=inputs, overwrite=args.overwrite, other_outputs={"--save_to": save_to})
    if args.min_diff and report["summary"]["layers_below_min_diff"]:
        warn("--min_diff is applied to each layer on its own (sd-scripts applied it once to the whole text encoder)")
    return report


if __name__ == "__main__":
    run_cli(setup_parser, main)
