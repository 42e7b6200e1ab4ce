"""Resize a LoRA to a new rank, fixed or chosen per layer (sd-scripts' resize_lora.py flags, exact and fast).

    python resize_lora.py --model big.safetensors --new_rank 32 --save_to small.safetensors
    python resize_lora.py --model big.safetensors --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.9 \\
        --save_to small.safetensors --verbose --report resize.json

LoRA/LoCon layers are resized from their factors (exact SVD of up@down without forming it); LoHa, LoKr,
full-diff and (with --base_model) DoRA layers become plain LoRA layers through a seeded randomized SVD of
their delta. alpha/rank is kept, so the resized file applies at the same strength. A rank is never raised:
layers already at or below the target keep their rank (with a warning). A Wan 2.2 A14B pair (--high_noise A
--low_noise B, or --model named for one expert with its partner next to it) is resized expert by expert.
"""

from __future__ import annotations

import argparse
import os

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import (
    add_common_args,
    add_dynamic_rank_args,
    nonnegative_int,
    positive_int,
    prepare_output,
    progress,
    run_cli,
    unused_compute_flags,
    warn,
)
from library.lowrank_rules import check_dynamic_flags
from library.wan_pairs import add_pair_args, expert_runs


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="LoRA to resize (any format and family loratools reads); a Wan "
                        "2.2 file named …high_noise… / …low_noise… is resized with its partner when that lies next to it")
    add_pair_args(parser, many=False)
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--new_rank", type=positive_int, default=4,
                        help="rank for Linear layers (convs too without --new_conv_rank); cap with --dynamic_method (default 4)")
    parser.add_argument("--new_conv_rank", type=positive_int, default=None,
                        help="rank (or cap) for conv layers, 1×1 included as sd-scripts (default: --new_rank)")
    add_dynamic_rank_args(parser, "choose the rank per layer: sv_ratio (keep σ > σ₀/p), sv_fro (keep a p share of the "
                               "Frobenius norm), sv_cumulative (keep a p share of Σσ)")
    parser.add_argument("--remove_conv_dims", action="store_true", help="drop the k×k conv (LoCon) layers")
    parser.add_argument("--remove_linear_dims", action="store_true", help="drop the Linear and 1×1 conv layers")
    parser.add_argument("--base_model", default=None,
                        help="base checkpoint, needed only to convert DoRA layers (their effect depends on W)")
    parser.add_argument("--family", default=None, help="model family when detection is ambiguous")
    parser.add_argument("--format", default=None, help="output format (default: that of the input; LyCORIS → kohya)")
    parser.add_argument("--allow_unmatched", action="store_true", help="drop input keys that map to no layer")
    parser.add_argument("--report", default=None, help="write the per-layer figures and the summary to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (LoHa/LoKr/DoRA layers)")
    parser.add_argument("--svd_oversample", type=nonnegative_int, default=None,
                        help="randomized SVD oversampling (default max(rank, 10))")
    parser.add_argument("--svd_power_iters", type=nonnegative_int, default=2,
                        help="randomized SVD power iterations (default 2)")
    add_common_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    """One resize, or one per Wan 2.2 expert (library.wan_pairs: --high_noise/--low_noise or a pair by name)."""
    runs = expert_runs(args, "model", many=False)
    return resize(args) if runs is None else {e: resize(ns, e) for e, ns in runs.items()}


def resize(args: argparse.Namespace, expert: str | None = None) -> dict:
    import torch

    from library.checks import refusing_nonfinite
    from library.cli import resolve_device
    from library.errors import LoraToolsError
    from library.formats import read_lora
    from library.lora_output import output_dtype, output_format, write_lora
    from library.resize import ResizeSettings, is_removed, resize_layers, summarize
    from library.resize_io import kept_as_they_are, layer_line, plan, resize_comment, resized_modules, summary_line, write_report
    from library.wan_pairs import expert_metadata

    if args.model is None:
        raise LoraToolsError("no LoRA given: use --model (or --high_noise / --low_noise for a Wan 2.2 pair)")
    check_dynamic_flags(args.dynamic_method, args.dynamic_param)
    for note in unused_compute_flags(args, "resize", device_used=True):  # --device runs the SVDs; fp32 maths
        warn(note)
    device = resolve_device(args.device)
    save_to = prepare_output(args.save_to, [args.model], args)
    with refusing_nonfinite():  # an SVD of NaN/inf is undefined: refuse, naming the tensors
        lora = read_lora(args.model, family=args.family, allow_unmatched=args.allow_unmatched)
    extra = expert_metadata(expert, [lora])
    save_dtype = output_dtype([lora], args.save_precision)
    settings = ResizeSettings(new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                              dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param,
                              remove_conv=args.remove_conv_dims, remove_linear=args.remove_linear_dims,
                              oversample=args.svd_oversample, power_iters=args.svd_power_iters, seed=args.seed,
                              alpha_dtype=torch.float32, device=device)  # the LoRA writer stores alpha in fp32
    jobs, passthrough = plan(lora.modules, args.base_model)
    kept_jobs = [job for job in jobs if not is_removed(job, settings)]
    unchanged = kept_as_they_are(jobs, settings)
    if unchanged:
        warn(unchanged)
    if args.dry_run:
        print(f"{args.model}: {lora.family} {lora.format}, {len(kept_jobs)} layers to resize, "
              f"{len(jobs) - len(kept_jobs)} removed, {len(passthrough)} passed through")
        return {}
    bar = progress(range(len(kept_jobs)), desc="resize", total=len(kept_jobs))
    results = resize_layers(jobs, settings, on_done=lambda _: bar.update(1))
    bar.close()

    reports = [results[job.name].report for job in kept_jobs]
    params = {"new_rank": args.new_rank, "new_conv_rank": args.new_conv_rank, "dynamic_method": args.dynamic_method,
              "dynamic_param": args.dynamic_param, "remove_conv_dims": args.remove_conv_dims,
              "remove_linear_dims": args.remove_linear_dims, "seed": args.seed}
    old_ranks = [job.adapter.rank for job in kept_jobs if job.adapter.rank]
    write_lora(save_to, resized_modules(lora.modules, results, passthrough), lora.family,
               output_format(args.format, lora), dtype=save_dtype, script="resize_lora.py", args=args,
               inputs=[args.model], base_metadata=lora.metadata, seed=args.seed,
               extra={**resize_comment(lora.metadata, old_ranks, params), **extra}, overwrite=args.overwrite)
    summary = summarize(reports)
    summary.update({"file_size_before": os.path.getsize(args.model), "file_size_after": os.path.getsize(save_to),
                    "removed": len(jobs) - len(kept_jobs), "passed_through": len(passthrough)})
    for line in ([layer_line(r) for r in reports] if args.verbose else []) + [summary_line(summary)]:
        if line:
            print(line)
    if args.report:
        write_report(args.report, args.model, save_to, summary, reports, inputs=[args.model],
                     overwrite=args.overwrite, other_outputs={"--save_to": save_to})
    return {"summary": summary, "layers": reports}


if __name__ == "__main__":
    run_cli(setup_parser, main)
