"""Merge FLUX.1 LoRAs of any trainer (kohya, AI-Toolkit, diffusers/PEFT, xlabs, BFL control, ComfyUI,
LyCORIS) into a Flux checkpoint, or into one LoRA. Accepts sd-scripts' flux_merge_lora.py flags.

    python flux_merge_lora.py --flux_model flux1-dev.safetensors --models a.safetensors b.safetensors \
        --ratios 1 0.7 --save_to merged.safetensors --save_precision bf16
    python flux_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --save_to ab.safetensors
"""

from __future__ import annotations

import argparse
import sys

from library.cli import add_common_args, compute_dtype, prepare_output, progress, resolve_device, run_cli, warn
from library.errors import LoraToolsError
from library.flux_merge import (
    FAMILY,
    TEXT_ENCODERS,
    inputs_for,
    leftover_inputs,
    model_jobs,
    read_flux_lora,
    te_side_path,
)
from library.formats import WRITE_FORMATS
from library.merge_plan import LoraInput
from library.merge_report import print_lines, report_lines
from library.metadata import checkpoint_metadata, modelspec, title_of
from library.methods import FACTOR, SIGN_METHODS, delta_aliases, names
from library.safetensors_io import open_checkpoint, parse_dtype

SCRIPT = "flux_merge_lora.py"
MODES = (*names(FACTOR), *delta_aliases())  # factor-space modes, then the delta-space svd / *_svd ones


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux_model", default=None,
                   help="Flux transformer to merge into: BFL single file (with or without model.diffusion_model.), "
                        "diffusers transformer file, or a sharded diffusers folder / its index json. "
                        "Without it (and without --clip_l/--t5xxl) the LoRAs are merged into one LoRA")
    p.add_argument("--clip_l", default=None, help="CLIP-L checkpoint to merge the LoRAs' CLIP-L parts into")
    p.add_argument("--t5xxl", default=None, help="T5-XXL checkpoint to merge the LoRAs' T5 parts into")
    p.add_argument("--models", nargs="+", required=True, help="LoRA files, any format, mixed freely")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="strength per LoRA (default 1.0 each)")
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
                        "(factor space, approximate, equal ranks), svd or *_svd (delta space, truncated to --new_rank)")
    p.add_argument("--concat", action="store_true", help="sd-scripts flag: same as --mode concat")
    p.add_argument("--shuffle", action="store_true", help="mix the rank columns of each merged LoRA with a seeded "
                                                          "random orthogonal matrix (the delta is unchanged)")
    p.add_argument("--new_rank", type=int, default=None, help="rank of the result for the svd modes")
    p.add_argument("--density", type=float, default=1.0, help="fraction kept by ties/dare/magnitude_prune")
    p.add_argument("--majority_sign_method", default="total", choices=SIGN_METHODS)
    p.add_argument("--seed", type=int, default=0, help="seed of DARE masks and --shuffle (per target)")
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


def _mode(args) -> str:
    if args.concat and args.mode not in (None, "concat"):
        raise LoraToolsError(f"--concat contradicts --mode {args.mode}")
    return args.mode or "concat"


def main(args: argparse.Namespace) -> dict:
    from library.inputs import lora_inputs, ratios_for

    ratios_for(args.ratios, args.models)  # counts checked before anything is read
    into_model = any((args.flux_model, args.clip_l, args.t5xxl))
    if into_model and (args.mode or args.concat or args.shuffle):
        raise LoraToolsError("--mode/--concat/--shuffle are for merging LoRAs into one LoRA (without --flux_model)")
    for flag, out in (("clip_l", "clip_l_save_to"), ("t5xxl", "t5xxl_save_to")):
        if bool(getattr(args, flag)) != bool(getattr(args, out)):
            raise LoraToolsError(f"--{flag} and --{out} go together")
    device = resolve_device(args.working_device)
    inputs = lora_inputs(args.models, args.ratios, reader=lambda p: read_flux_lora(p, args.allow_unmatched))
    for inp in inputs:
        comps = sorted({m.target.component for m in inp.lora.modules})
        print(f"{inp.path}: FLUX.1 {inp.lora.format} LoRA, {len(inp.lora.modules)} modules ({', '.join(comps)})",
              file=sys.stderr)
        if inp.lora.unmatched:
            warn(f"{inp.path}: {len(inp.lora.unmatched)} keys match nothing and are skipped (--allow_unmatched)")
    if into_model:
        return merge_into_models(args, inputs, device)
    return merge_into_lora(args, inputs, _mode(args), device, args.save_to, args.format)


# ---------------------------------------------------------------------------------------------------------
# LoRAs into one LoRA


def merge_into_lora(args, inputs: list[LoraInput], mode: str, device, save_to: str | None, fmt: str,
                    label: str = "merged") -> dict:
    from library.lora_merge import MergeOptions, plan_lora_merge, run_lora_merge, write_merged

    save_to = prepare_output(save_to, args.models, args)
    options = MergeOptions(args.density, args.majority_sign_method, args.seed, args.shuffle, args.new_rank, device)
    plan = plan_lora_merge(inputs, mode, fmt, save_to, options)
    if args.dry_run:
        print(f"{label}, dry run, nothing written:\n  " + "\n  ".join(plan.lines()), file=sys.stderr)
        return {"plan": plan}
    merged = run_lora_merge(plan)
    comps = sorted({m.target.component for m in merged.modules})
    line = merged.summary if plan.mode == "concat" or merged.results is not None else (
        f"approximate: {merged.summary} (the svd modes work in delta space)")
    print(f"{label}: {len(merged.modules)} modules ({', '.join(comps)}), mode {mode}, format {plan.fmt}: {line}",
          file=sys.stderr)
    write_merged(plan, merged, script=SCRIPT, args=args, save_precision=args.save_precision,
                 no_metadata=args.no_metadata, overwrite=args.overwrite)
    print(f"saved {save_to}", file=sys.stderr)
    return {"modules": merged.modules, "save_to": save_to, "plan": plan}


# ---------------------------------------------------------------------------------------------------------
# LoRAs into checkpoints


def merge_into_models(args, inputs: list[LoraInput], device) -> dict:
    from library.checkpoint_apply import apply_plan
    from library.merge_plan import build_plan

    encoders = {c: (getattr(args, flag), getattr(args, f"{flag}_save_to")) for c, (flag, _p) in TEXT_ENCODERS.items()}
    jobs, left = model_jobs(inputs, args.flux_model, args.save_to, encoders)
    all_inputs = [*args.models, *(j.model for j in jobs)]
    outs = [prepare_output(j.save_to, all_inputs, args, flag=j.flag) for j in jobs]
    results = {}
    for job, save_to in zip(jobs, outs, strict=True):
        comp, model = job.component, job.model
        with open_checkpoint(model) as reader:
            layout = job.layout_of(reader)
            plan = build_plan(reader, layout, inputs_for(inputs, comp), allow_unmatched=args.allow_unmatched)
            print(f"{model}: layout {layout.name}; " + "; ".join(plan.summary()), file=sys.stderr)
            if args.verbose > 1:
                print_lines(plan.details(), args.verbose, file=sys.stderr)
            if plan.unmatched:
                warn(f"{len(plan.unmatched)} module(s) skipped (--allow_unmatched): {plan.unmatched[0]} ...")
            if args.dry_run:
                continue
            meta = dict(reader.metadata)
            if not args.no_metadata:
                merged = [title_of(model, reader.metadata)] + [title_of(i.path, i.lora.metadata) for i in inputs]
                spec = modelspec(FAMILY, save_to, lora=False, merged_from=merged) if comp == "transformer" else {}
                meta = checkpoint_metadata(reader.metadata, script=SCRIPT, args=args, inputs=args.models, extra=spec)
            result = apply_plan(reader, plan, save_to, metadata=meta, save_dtype=parse_dtype(args.save_precision),
                                compute_dtype=compute_dtype(args), device=device, inputs=all_inputs,
                                overwrite=args.overwrite, measure=True if args.verbose else None,
                                progress=lambda keys, c=comp: progress(keys, desc=f"merging {c}", total=len(keys)))
        results[comp] = result
        lines, warnings = report_lines(save_to, result, args.verbose, "--save_precision")
        print("\n".join(lines), file=sys.stderr)
        for message in warnings:
            warn(message)
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
