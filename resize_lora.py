"""Resize a LoRA to a new rank, fixed or chosen per layer (sd-scripts' resize_lora.py flags, exact and fast).

    python resize_lora.py --model big.safetensors --new_rank 32 --save_to small.safetensors
    python resize_lora.py --model big.safetensors --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.9 \\
        --save_to small.safetensors --verbose --report resize.json

LoRA/LoCon layers are resized from their factors (exact SVD of up@down without forming it); LoHa, LoKr,
full-diff and (with --base_model) DoRA layers become plain LoRA layers through a seeded randomized SVD of
their delta. alpha/rank is kept, so the resized file applies at the same strength.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from library.checks import refusing_nonfinite
from library.cli import add_common_args, prepare_output, progress, resolve_device, run_cli
from library.destination import write_text
from library.errors import LoraToolsError
from library.lowrank import DYNAMIC_METHODS
from library.resize import ResizeJob, ResizeSettings, is_removed, resize_layers, summarize
from library.safetensors_io import open_checkpoint
from networks import adapter_from_tensors


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="LoRA to resize (any format and family loratools reads)")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--new_rank", type=int, default=4,
                        help="rank for Linear and 1×1 conv layers; the cap when --dynamic_method is given (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank (or cap) for k×k conv layers (default: --new_rank)")
    parser.add_argument("--dynamic_method", default=None, choices=DYNAMIC_METHODS,
                        help="choose the rank per layer: sv_ratio (keep σ > σ₀/p), sv_fro (keep a p share of the "
                             "Frobenius norm), sv_cumulative (keep a p share of Σσ)")
    parser.add_argument("--dynamic_param", type=float, default=None, help="p for --dynamic_method")
    parser.add_argument("--remove_conv_dims", action="store_true", help="drop the k×k conv (LoCon) layers")
    parser.add_argument("--remove_linear_dims", action="store_true", help="drop the Linear and 1×1 conv layers")
    parser.add_argument("--base_model", default=None,
                        help="base checkpoint, needed only to convert DoRA layers (their effect depends on W)")
    parser.add_argument("--family", default=None, help="model family when detection is ambiguous")
    parser.add_argument("--format", default=None, help="output format (default: that of the input; LyCORIS → kohya)")
    parser.add_argument("--allow_unmatched", action="store_true", help="drop input keys that map to no layer")
    parser.add_argument("--report", default=None, help="write the per-layer figures and the summary to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (LoHa/LoKr/DoRA layers)")
    parser.add_argument("--svd_oversample", type=int, default=None,
                        help="randomized SVD oversampling (default max(rank, 10))")
    parser.add_argument("--svd_power_iters", type=int, default=2, help="randomized SVD power iterations (default 2)")
    add_common_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    from library.formats import read_lora
    from library.lora_output import output_dtype, output_format, write_lora

    device = resolve_device(args.device)
    save_to = prepare_output(args.save_to, [args.model], args)
    with refusing_nonfinite():  # an SVD of NaN/inf is undefined: refuse, naming the tensors
        lora = read_lora(args.model, family=args.family, allow_unmatched=args.allow_unmatched)
    save_dtype = output_dtype([lora], args.save_precision)
    settings = ResizeSettings(new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                              dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param,
                              remove_conv=args.remove_conv_dims, remove_linear=args.remove_linear_dims,
                              oversample=args.svd_oversample, power_iters=args.svd_power_iters, seed=args.seed,
                              alpha_dtype=torch.float32, device=device)  # the LoRA writer stores alpha in fp32
    jobs, passthrough = plan(lora.modules, args)
    kept_jobs = [job for job in jobs if not is_removed(job, settings)]
    if args.dry_run:
        print(f"{args.model}: {lora.family} {lora.format}, {len(kept_jobs)} layers to resize, "
              f"{len(jobs) - len(kept_jobs)} removed, {len(passthrough)} passed through")
        return {}
    bar = progress(range(len(kept_jobs)), desc="resize", total=len(kept_jobs), enabled=sys.stderr.isatty())
    results = resize_layers(jobs, settings, on_done=lambda _: bar.update(1))
    bar.close()

    by_source = {m.source: m for m in lora.modules}
    modules = [type(by_source[name])(by_source[name].target, r.tensors, name) for name, r in results.items()]
    modules += passthrough
    reports = [results[job.name].report for job in kept_jobs]
    old_ranks = [job.adapter.rank for job in kept_jobs if job.adapter.rank]
    write_lora(save_to, modules, lora.family, output_format(args.format, lora), dtype=save_dtype,
               script="resize_lora.py", args=args, inputs=[args.model], base_metadata=lora.metadata,
               seed=args.seed, extra=resize_comment(lora, old_ranks, args), overwrite=args.overwrite)
    summary = summarize(reports)
    summary.update({"file_size_before": os.path.getsize(args.model), "file_size_after": os.path.getsize(save_to),
                    "removed": len(jobs) - len(kept_jobs), "passed_through": len(passthrough)})
    print_summary(reports, summary, args)
    if args.report:
        write_text(args.report, json.dumps({"input": args.model, "output": save_to, "summary": summary, "layers": reports},
                                           indent=1), inputs=[args.model], overwrite=args.overwrite, flag="--report",
                   other_outputs={"--save_to": save_to})
    return {"summary": summary, "layers": reports}


def plan(modules, args) -> tuple[list[ResizeJob], list]:
    """One job per module with a weight delta; modules with only a bias change pass through unchanged."""
    jobs, passthrough = [], []
    base = open_checkpoint(args.base_model) if args.base_model else None
    try:
        for module in modules:
            adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
            if adapter.kind == "full" and "diff" not in module.tensors and "w_norm" not in module.tensors:
                passthrough.append(module)
                continue
            weight = base_weight(base, module, args.base_model) if adapter.dora is not None and base else None
            jobs.append(ResizeJob(module.source, tuple(module.target.shape), adapter, weight))
    finally:
        if base is not None:
            base.close()
    return jobs, passthrough


def base_weight(reader, module, path: str) -> torch.Tensor:
    """The base weight a DoRA module applies to: its canonical key (and row slice) in --base_model."""
    key = module.target.key
    if key not in reader:
        raise LoraToolsError(f"base model has no weight {key!r} for DoRA module {module.source}", file=path, key=key)
    weight = reader.get(key)
    if module.target.rows:
        weight = weight[module.target.rows[0]:module.target.rows[1]]
    if tuple(weight.shape) != tuple(module.target.shape):
        raise LoraToolsError(f"base weight shape {tuple(weight.shape)} differs from the LoRA's "
                             f"{tuple(module.target.shape)}", file=path, key=key)
    return weight


def resize_comment(lora, old_ranks, args) -> dict[str, str]:
    """sd-scripts' training comment (what the resize did, before the input's own comment) and our record."""
    old = max(old_ranks) if old_ranks else 0
    if args.dynamic_method:
        comment = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old}; "
    else:
        conv = f" (conv: {args.new_conv_rank})" if args.new_conv_rank else ""
        comment = f"dimension is resized from {old} to {args.new_rank}{conv}; "
    params = {"new_rank": args.new_rank, "new_conv_rank": args.new_conv_rank, "dynamic_method": args.dynamic_method,
              "dynamic_param": args.dynamic_param, "remove_conv_dims": args.remove_conv_dims,
              "remove_linear_dims": args.remove_linear_dims, "seed": args.seed}
    return {"ss_training_comment": comment + lora.metadata.get("ss_training_comment", ""),
            "loratools.resize": json.dumps(params, sort_keys=True)}


def print_summary(reports, summary, args) -> None:
    if args.verbose:
        for r in reports:
            print(f"{r['target']}: rank {r['rank_in']} -> {r['rank_out']}, fro retained {r['fro_retained']:.4f}, "
                  f"relative error {r['relative_error']:.4f}, max(S) ratio {r['max_sv_ratio']:.3g} "
                  f"[{r['type']}, {r['route']}]")
    if summary.get("layers"):
        print(f"resized {summary['layers']} layers to ranks {summary['ranks'][0]}..{summary['ranks'][-1]}: "
              f"fro retained mean {summary['fro_retained_mean']:.4f}, min {summary['fro_retained_min']:.4f}; "
              f"file {summary['file_size_before']:,} -> {summary['file_size_after']:,} bytes")


if __name__ == "__main__":
    run_cli(setup_parser, main)
