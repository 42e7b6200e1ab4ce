"""Merge several LoRAs into one LoRA of a chosen rank, through an SVD of each merged layer.

    python svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.7 --new_rank 32 --save_to ab.safetensors
    python svd_merge_lora.py --models a.safetensors b.safetensors --mode ties --density 0.5 --new_rank 32 --save_to t.safetensors

Replaces sd-scripts' svd_merge_lora.py (same flags) and ComfyUI Power-Merge's "PM Merge LoRA SVD" node
(`--mode add_svd|ties_svd|dare_linear_svd|dare_ties_svd|magnitude_prune_svd`, `--density`, `--svd_rank`,
`--svd_conv_rank`). Inputs: any format and family loratools reads, of different ranks, covering different
layers; LoCon 3×3 convs, Tucker, LoHa and LoKr. DoRA needs the base weight: use merge_lora.py --sd_model.

Per layer, the merged delta M = method(ratioᵢ·ΔWᵢ) is reduced to the requested rank:
- `add` over LoRA/LoCon inputs: exact SVD of Σ ratioᵢ·ΔWᵢ from the stacked factors (QR + small core SVD),
  never forming M, batched over layers of equal shape — the optimal truncation, error known exactly.
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (PEFT's definitions; DARE rescales by 1/density,
  masks seeded by (--seed, layer, input)), and LoHa/LoKr inputs: M formed one layer at a time, randomized
  SVD (oversampling, power iterations); the relative error against M is measured and reported.
No quantile clamp unless --clamp_quantile is given (sd-scripts' 0.99 clamp adds 9–19 % error per layer).
Output alpha = rank (scale 1), so the product is exactly what the SVD kept.
"""

from __future__ import annotations

import argparse

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import (
    add_common_args,
    add_dynamic_rank_args,
    finite_float,
    nonnegative_int,
    positive_int,
    prepare_output,
    progress,
    run_cli,
)
from library.formats.specs import FORMATS
from library.lowrank_rules import check_dynamic_flags, check_quantile
from library.methods import DELTA, SIGN_METHODS, mode_choices


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files (any format loratools reads)")
    parser.add_argument("--ratios", nargs="*", type=finite_float, default=None,
                        help="strength per model (negative allowed; default 1 each)")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--new_rank", "--svd_rank", type=positive_int, default=4,
                        help="rank of Linear and 1×1 conv layers; the cap when --dynamic_method is used (default 4)")
    parser.add_argument("--new_conv_rank", "--svd_conv_rank", type=positive_int, default=None,
                        help="rank of k×k conv layers (default: --new_rank)")
    parser.add_argument("--mode", default="add", choices=mode_choices(DELTA),
                        help="how the per-layer deltas ratioᵢ·ΔWᵢ are combined before the SVD (default add)")
    parser.add_argument("--density", type=finite_float, default=1.0,
                        help="ties/dare/magnitude_prune: share of entries kept, in (0, 1] (default 1)")
    parser.add_argument("--majority_sign_method", default="total", choices=SIGN_METHODS,
                        help="ties/dare_ties sign election (default total)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE masks and of the randomized SVD")
    add_dynamic_rank_args(parser, "per-layer rank as resize_lora.py: sv_ratio, sv_fro or sv_cumulative (capped by "
                               "--new_rank / --new_conv_rank)")
    parser.add_argument("--clamp_quantile", type=finite_float, default=None,
                        help="clip both factors to ±this quantile of their entries (sd-scripts used 0.99 always; "
                             "off by default because it adds error, reported with -v)")
    parser.add_argument("--svd_oversample", type=nonnegative_int, default=None,
                        help="randomized SVD oversampling for dense layers (default max(rank, 10))")
    parser.add_argument("--svd_power_iters", type=nonnegative_int, default=2,
                        help="randomized SVD power iterations for dense layers (default 2)")
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="block weights per model: a webui lora-block-weight string, a JSON list (sd-scripts) "
                             "or a preset name; '-' for none")
    parser.add_argument("--lbw_presets", default=None, help="toml (NAME = \"1,0,…\") or webui lbwpresets.txt file")
    parser.add_argument("--lbw_x", type=finite_float, default=1.0, help="value of X in block-weight strings (default 1)")
    parser.add_argument("--format", default=None, choices=tuple(FORMATS),
                        help="output LoRA format (default: that of the first input; LyCORIS and others → kohya)")
    parser.add_argument("--family", default=None, help="model family when detection is ambiguous (sd1, sd2, sdxl, flux1…)")
    parser.add_argument("--allow_unmatched", action="store_true", help="skip input keys that map to no layer")
    parser.add_argument("--report", default=None, help="write per-layer figures and a summary to this JSON file")
    parser.add_argument("--no_metadata", action="store_true", help="write only the metadata a loader needs")
    add_common_args(parser)
    return parser


def settings_from(args: argparse.Namespace):
    import torch

    from library.cli import compute_dtype, resolve_device, warn
    from library.svd_merge import MergeSettings

    dtype = compute_dtype(args)
    if dtype not in (torch.float32, torch.float64):
        warn(f"--precision {args.precision}: QR/SVD have no half-precision kernels; the maths runs in fp32")
    return MergeSettings(mode=args.mode, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                         dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param, density=args.density,
                         sign_method=args.majority_sign_method, seed=args.seed, clamp_quantile=args.clamp_quantile,
                         oversample=args.svd_oversample, power_iters=args.svd_power_iters,
                         device=resolve_device(args.device), dtype=dtype)


def main(args: argparse.Namespace) -> dict:
    from library.block_weights import block_weights_for_models
    from library.checks import refusing_nonfinite
    from library.errors import LoraToolsError
    from library.inputs import lora_inputs, ratios_for
    from library.lora_combine import group_targets
    from library.lora_output import output_format
    from library.svd_merge import merge_layers, uses_factored_route
    from library.svd_merge_io import jobs_from_groups, layer_lines, summary, summary_line, write_merged

    ratios = ratios_for(args.ratios, args.models)  # a count that does not match --models: refused before any work
    check_dynamic_flags(args.dynamic_method, args.dynamic_param)
    check_quantile(args.clamp_quantile)
    settings = settings_from(args)
    save_to = prepare_output(args.save_to, args.models, args)
    block_weights = block_weights_for_models(args.lbws, len(args.models), presets_file=args.lbw_presets,
                                             seed=args.seed, x=args.lbw_x)
    with refusing_nonfinite():  # an SVD of NaN/inf is undefined: refuse, naming the file and tensors
        inputs = lora_inputs(args.models, ratios, block_weights, family=args.family,
                             allow_unmatched=args.allow_unmatched)
    family, groups = group_targets(inputs)
    if not groups:
        raise LoraToolsError("nothing to merge: every module has strength 0")
    jobs = jobs_from_groups(groups, len(inputs))
    fmt = output_format(args.format, inputs[0].lora)
    factored = sum(uses_factored_route(j, settings) for j in jobs)
    print(f"{len(inputs)} {family} LoRA(s) -> {len(jobs)} layers, mode {settings.mode}, format {fmt}: "
          f"{factored} exact factored, {len(jobs) - factored} dense (randomized SVD)")
    if args.dry_run:
        return {"jobs": jobs}

    bar = progress(range(len(jobs)), desc="svd merge", total=len(jobs))
    results = merge_layers(jobs, settings, on_done=lambda _: bar.update(1))
    bar.close()

    stats = summary(results)
    for line in [summary_line(stats)] + layer_lines([results[j.name].report for j in jobs], args.verbose):
        print("  " + line)

    modules = write_merged(save_to, groups, results, stats, inputs, family, fmt, mode=settings.mode, seed=args.seed,
                           randomized_svd=factored < len(jobs), save_precision=args.save_precision,
                           report=args.report, report_extra={"models": args.models, "ratios": ratios,
                                                             "mode": settings.mode, "family": family, "format": fmt,
                                                             "save_to": save_to},
                           args=args, minimal=args.no_metadata, overwrite=args.overwrite)
    print(f"wrote {save_to}")
    return {"results": results, "summary": stats, "save_to": save_to, "modules": modules}


if __name__ == "__main__":
    run_cli(setup_parser, main)
