"""Merge FLUX.1 LoRAs of any trainer (kohya, AI-Toolkit, diffusers/PEFT, xlabs, BFL control, ComfyUI,
LyCORIS) into a Flux checkpoint, or into one LoRA. Accepts sd-scripts' flux_merge_lora.py flags.

    python flux_merge_lora.py --flux_model flux1-dev.safetensors --models a.safetensors b.safetensors \
        --ratios 1 0.7 --save_to merged.safetensors --save_precision bf16
    python flux_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --save_to ab.safetensors
"""

from __future__ import annotations

import argparse
import sys

from library.cli import (
    add_common_args,
    add_lora_merge_args,
    compute_dtype,
    positive_int,
    prepare_output,
    progress,
    ratio_value,
    run_cli,
)
from library.console import warn
from library.formats.specs import WRITE_FORMATS
from library.methods import FACTOR, delta_aliases, delta_only, names

# Torch and the maths are imported inside the functions that do the work, so that --help stays fast.
SCRIPT = "flux_merge_lora.py"
MODES = (*names(FACTOR), *delta_aliases(), *delta_only())  # factor space, then delta space (svd, *_svd, tsv, …)


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux_model", default=None,
                   help="Flux transformer to merge into: BFL single file (with or without model.diffusion_model.), "
                        "diffusers transformer file, or a sharded diffusers folder / its index json. "
                        "Without it (and without --clip_l/--t5xxl) the LoRAs are merged into one LoRA")
    p.add_argument("--clip_l", default=None, help="CLIP-L checkpoint to merge the LoRAs' CLIP-L parts into")
    p.add_argument("--t5xxl", default=None, help="T5-XXL checkpoint to merge the LoRAs' T5 parts into")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files, any format, mixed freely")
    p.add_argument("--ratios", nargs="+", type=ratio_value, default=None,
                   help="strength per LoRA (default 1.0 each; nan/inf refused), or auto (inverse delta norms)")
    p.add_argument("--save_to", default=None, help="output: merged Flux checkpoint, or the merged LoRA")
    p.add_argument("--clip_l_save_to", default=None, help="output for the merged CLIP-L (needs --clip_l)")
    p.add_argument("--t5xxl_save_to", default=None, help="output for the merged T5-XXL (needs --t5xxl)")
    p.add_argument("--te_lora_save_to", default=None,
                   help="when merging into a checkpoint, where text-encoder parts with no --clip_l/--t5xxl go, as "
                        "a LoRA (default: <save_to>_te_lora.safetensors); they are never dropped")
    p.add_argument("--loading_device", default="cpu",
                   help="sd-scripts flag; we stream one tensor at a time from disk, so it only names where the "
                        "tensor is read to (cpu)")
    p.add_argument("--working_device", default="auto", help="where deltas and sums are computed (auto, cpu, cuda[:N])")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="LoRA+LoRA mode: concat (default, exact), add/ties/dare_linear/dare_ties/magnitude_prune "
                        "(factor space, approximate, equal ranks); delta space, truncated to --new_rank: svd or *_svd, "
                        "and tsv/iso_c/iso_cts/knots/np_lora (see svd_merge_lora.py)")
    add_lora_merge_args(p, singular=True)
    p.add_argument("--new_rank", type=positive_int, default=None, help="rank of the result for the svd modes")
    p.add_argument("--format", default="kohya", choices=WRITE_FORMATS, help="LoRA output format (default kohya)")
    p.add_argument("--allow_unmatched", action="store_true",
                   help="skip LoRA keys / targets that match nothing instead of failing")
    p.add_argument("--no_metadata", action="store_true", help="write only the metadata a loader needs")
    p.add_argument("--diffusers", action="store_true",
                   help="sd-scripts flag, not needed: every LoRA's format is detected from its keys")
    p.add_argument("--mem_eff_load_save", action="store_true",
                   help="sd-scripts flag, not needed: we always stream tensor by tensor")
    add_common_args(p, device=False)
    return p


def main(args: argparse.Namespace) -> dict:
    from library.cli import resolve_device  # asks accelerate, which imports torch
    from library.flux_merge import TEXT_ENCODERS, check_mode, encoder_pairs, output_flags, print_inputs, read_flux_lora
    from library.inputs import lora_inputs, ratios_for

    ratios_for(args.ratios, args.models)  # counts checked before anything is read
    into_model = any((args.flux_model, args.clip_l, args.t5xxl))
    mode = check_mode(into_model, args.mode, args.concat, args.shuffle)
    encoders = encoder_pairs({c: (getattr(args, f), getattr(args, f"{f}_save_to")) for c, (f, _p) in TEXT_ENCODERS.items()})
    # Every output against every input and every other output, before the first file is read.
    outputs = output_flags(args.save_to, encoders, args.te_lora_save_to, into_model=into_model)
    models = [*args.models, *(m for m in (args.flux_model, args.clip_l, args.t5xxl) if m)]
    for flag, path in outputs.items():
        prepare_output(path, models, args, flag=flag, other_outputs={f: p for f, p in outputs.items() if f != flag})
    device = resolve_device(args.working_device)
    inputs = lora_inputs(args.models, args.ratios, reader=lambda p: read_flux_lora(p, args.allow_unmatched))
    print_inputs(inputs)
    if into_model:
        return merge_into_models(args, inputs, encoders, device)
    return merge_into_lora(args, inputs, mode, device, args.save_to, args.format)


def merge_into_lora(args, inputs: list, mode: str, device, save_to: str | None, fmt: str,
                    label: str = "merged") -> dict:
    from library.lora_merge import MergeOptions, merge_and_write, plan_lora_merge

    save_to = prepare_output(save_to, args.models, args)
    plan = plan_lora_merge(inputs, mode, fmt, save_to, MergeOptions.from_args(args, device))
    merged = merge_and_write(plan, describe=lambda m: print(m.component_line(plan, label), file=sys.stderr),
                             script=SCRIPT, args=args, save_precision=args.save_precision, dry_run=args.dry_run,
                             no_metadata=args.no_metadata, overwrite=args.overwrite, label=label, file=sys.stderr,
                             default_mode=label == "merged" and args.mode is None and not args.concat)
    if merged is None:
        return {"plan": plan}
    return {"modules": merged.modules, "save_to": save_to, "plan": plan}


def merge_into_models(args, inputs: list, encoders: dict, device) -> dict:
    from library.checkpoint_apply import apply_plan
    from library.flux_merge import TEXT_ENCODERS, checkpoint_meta, inputs_for, leftover_inputs, model_jobs, te_side_path
    from library.merge_plan import build_plan
    from library.merge_report import print_lines, print_report
    from library.safetensors_io import open_checkpoint, parse_dtype

    jobs, left = model_jobs(inputs, args.flux_model, args.save_to, encoders)
    all_inputs = [*args.models, *(j.model for j in jobs)]
    outs = [prepare_output(j.save_to, all_inputs, args, flag=j.flag) for j in jobs]
    results = {}
    for job, save_to in zip(jobs, outs, strict=True):
        with open_checkpoint(job.model) as reader:
            layout = job.layout_of(reader)
            plan = build_plan(reader, layout, inputs_for(inputs, job.component), allow_unmatched=args.allow_unmatched)
            print(f"{job.model}: layout {layout.name}; " + "; ".join(plan.summary()), file=sys.stderr)
            if args.verbose > 1:
                print_lines(plan.details(), args.verbose, file=sys.stderr)
            if plan.unmatched:
                warn(f"{len(plan.unmatched)} module(s) skipped (--allow_unmatched): {plan.unmatched[0]} ...")
            if args.dry_run:
                continue
            meta = checkpoint_meta(reader, job.model, save_to, job.component, inputs, script=SCRIPT, args=args,
                                   models=args.models, minimal=args.no_metadata)
            results[job.component] = apply_plan(
                reader, plan, save_to, metadata=meta, save_dtype=parse_dtype(args.save_precision),
                compute_dtype=compute_dtype(args), device=device, inputs=all_inputs, overwrite=args.overwrite,
                measure=True if args.verbose else None,
                progress=lambda keys, c=job.component: progress(keys, desc=f"merging {c}", total=len(keys)))
        print_report(save_to, results[job.component], args.verbose, "--save_precision", file=sys.stderr)
    if left:
        # Text-encoder parts with nowhere to go are kept, as an exact (concat) LoRA next to the output.
        side = args.te_lora_save_to or te_side_path(args.save_to or outs[0])
        warn(f"the LoRAs change {', '.join(TEXT_ENCODERS[c][0] for c in left)} but no checkpoint for it was given "
             f"(--clip_l/--t5xxl): those modules are written as a LoRA to {side}")
        results["te_lora"] = merge_into_lora(args, leftover_inputs(inputs, left), "concat", device, side, args.format,
                                             label="text encoders")
    return results


if __name__ == "__main__":
    run_cli(setup_parser, main)
