"""Merge FLUX.1 LoRAs of any trainer (kohya, AI-Toolkit, diffusers/PEFT, xlabs, BFL control, ComfyUI,
LyCORIS) into a Flux checkpoint, or into one LoRA. Accepts sd-scripts' flux_merge_lora.py flags.

    python flux_merge_lora.py --flux_model flux1-dev.safetensors --models a.safetensors b.safetensors \
        --ratios 1 0.7 --save_to merged.safetensors --save_precision bf16
    python flux_merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --save_to ab.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from library.cli import (
    add_common_args,
    check_counts,
    compute_dtype,
    prepare_output,
    progress,
    resolve_device,
    run_cli,
    warn,
)
from library.errors import LoraToolsError
from library.flux_merge import FAMILY, TEXT_ENCODERS, flux_layout, part_of, read_flux_lora, text_encoder_layout
from library.formats import WRITE_FORMATS, lora_tensors
from library.lora_combine import MODES as FACTOR_MODES
from library.merge_plan import LoraInput
from library.metadata import lora_metadata, minimal_metadata, modelspec, provenance, title_of
from library.safetensors_io import cast_clamped, open_checkpoint, parse_dtype, save_tensors

SCRIPT = "flux_merge_lora.py"
SVD_MODES = ("svd", "add_svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MODES = (*FACTOR_MODES, *SVD_MODES)


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
    p.add_argument("--majority_sign_method", default="total", choices=("total", "frequency"))
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


def _ratios(args) -> list[float]:
    check_counts(args.ratios, args.models, "--ratios")
    return list(args.ratios) if args.ratios is not None else [1.0] * len(args.models)


def _mode(args) -> str:
    if args.concat and args.mode not in (None, "concat"):
        raise LoraToolsError(f"--concat contradicts --mode {args.mode}")
    return args.mode or "concat"


def main(args: argparse.Namespace) -> dict:
    ratios = _ratios(args)
    into_model = any((args.flux_model, args.clip_l, args.t5xxl))
    if into_model and (args.mode or args.concat or args.shuffle):
        raise LoraToolsError("--mode/--concat/--shuffle are for merging LoRAs into one LoRA (without --flux_model)")
    for flag, out in (("clip_l", "clip_l_save_to"), ("t5xxl", "t5xxl_save_to")):
        if bool(getattr(args, flag)) != bool(getattr(args, out)):
            raise LoraToolsError(f"--{flag} and --{out} go together")
    device = resolve_device(args.working_device)
    inputs = []
    for path, ratio in zip(args.models, ratios, strict=True):
        lora = read_flux_lora(path, args.allow_unmatched)
        comps = sorted({m.target.component for m in lora.modules})
        print(f"{path}: FLUX.1 {lora.format} LoRA, {len(lora.modules)} modules ({', '.join(comps)})", file=sys.stderr)
        if lora.unmatched:
            warn(f"{path}: {len(lora.unmatched)} keys match nothing and are skipped (--allow_unmatched)")
        inputs.append(LoraInput(path, lora, ratio))
    if into_model:
        return merge_into_models(args, inputs, device)
    return merge_into_lora(args, inputs, _mode(args), device, args.save_to, args.format)


# ---------------------------------------------------------------------------------------------------------
# LoRAs into one LoRA


def combined_modules(inputs: list[LoraInput], mode: str, args, device) -> tuple[list, list[int], list[float], str]:
    """(modules, ranks, alphas, summary line) through merge_lora's or svd_merge_lora's engine."""
    from library.lora_combine import combine, group_targets

    _family, groups = group_targets(inputs)
    if not groups:
        raise LoraToolsError("nothing to merge: every module has strength 0")
    if mode in SVD_MODES:
        from library.svd_merge import MergeSettings, merge_layers
        from library.svd_merge_io import jobs_from_groups, modules_from_results, summary

        if args.new_rank is None:
            raise LoraToolsError(f"--mode {mode} needs --new_rank")
        settings = MergeSettings(mode="add" if mode == "svd" else mode, new_rank=args.new_rank, density=args.density,
                                 sign_method=args.majority_sign_method, seed=args.seed, device=device)
        results = merge_layers(jobs_from_groups(groups, len(inputs)), settings)
        st = summary(results)
        line = (f"relative error vs the exact merged delta: mean {st['relative_error_mean']:.3g}, "
                f"max {st['relative_error_max']:.3g} ({st['worst_layer']})")
        return (modules_from_results(groups, results), [r.report["rank_out"] for r in results.values()],
                [r.alpha for r in results.values()], line)
    modules, reports = combine(groups, mode, density=args.density, sign_method=args.majority_sign_method,
                               seed=args.seed, shuffle=args.shuffle)
    ranks = [r.rank for r in reports if r.rank is not None]
    errors = [r.relative_error for r in reports if r.kind == "lora" and r.relative_error is not None]
    line = "exact" if mode == "concat" else (
        f"approximate: relative error of the merged delta mean {sum(errors) / max(len(errors), 1):.3g}, "
        f"max {max(errors, default=0):.3g} (the svd modes work in delta space)")
    return modules, ranks, [float(r) for r in ranks], line


def _storage_dtype(inputs: list[LoraInput]):
    import torch

    for inp in inputs:
        for m in inp.lora.modules:
            for suffix, t in m.tensors.items():
                if suffix != "alpha" and t.is_floating_point():
                    return t.dtype
    return torch.float32


def merge_into_lora(args, inputs: list[LoraInput], mode: str, device, save_to: str | None, fmt: str,
                    label: str = "merged") -> dict:
    save_to = prepare_output(save_to, args.models, args)
    modules, ranks, alphas, line = combined_modules(inputs, mode, args, device)
    comps = sorted({m.target.component for m in modules})
    print(f"{label}: {len(modules)} modules ({', '.join(comps)}), mode {mode}, format {fmt}: {line}", file=sys.stderr)
    if args.dry_run:
        return {"modules": modules}
    tensors, extra = lora_tensors(modules, FAMILY, fmt)
    save_dtype = parse_dtype(args.save_precision) if args.save_precision else _storage_dtype(inputs)
    # alphas stay float32: a summed rank is not always exact in bf16
    tensors = {k: v if k.endswith(".alpha") or not v.is_floating_point() else cast_clamped(v, save_dtype).contiguous()
               for k, v in tensors.items()}
    seeded = args.shuffle or "dare" in mode or mode in SVD_MODES
    meta = lora_metadata(inputs[0].lora.metadata, family=FAMILY, ranks=ranks or [0], alphas=alphas or [0],
                         save_to=save_to, merged_from=[title_of(i.path, i.lora.metadata) for i in inputs],
                         extra=provenance(SCRIPT, args, args.models, seed=args.seed if seeded else None))
    meta.update(extra)
    if args.no_metadata:
        meta = minimal_metadata(meta)
    save_tensors(save_to, tensors, meta, inputs=args.models, overwrite=args.overwrite, kohya_hashes=True)
    print(f"saved {save_to}", file=sys.stderr)
    return {"modules": modules, "save_to": save_to}


# ---------------------------------------------------------------------------------------------------------
# LoRAs into checkpoints


def _te_side_path(save_to: str) -> str:
    stem, _ext = os.path.splitext(save_to)
    return stem + "_te_lora.safetensors"


def merge_into_models(args, inputs: list[LoraInput], device) -> dict:
    from library.checkpoint_apply import apply_plan
    from library.merge_plan import build_plan

    def part(component: str) -> list[LoraInput]:
        return [LoraInput(i.path, part_of(i.lora, component), i.ratio) for i in inputs]

    has = {c: any(i.lora.modules for i in part(c)) for c in ("transformer", *TEXT_ENCODERS)}
    if has["transformer"] and not args.flux_model:
        raise LoraToolsError("the LoRAs change the Flux transformer but no --flux_model was given")
    jobs = []  # (component, model, save_to flag, save_to, layout function)
    if args.flux_model:
        jobs.append(("transformer", args.flux_model, "--save_to", args.save_to, flux_layout))
    left = []
    for comp, (flag, _prefix) in TEXT_ENCODERS.items():
        if getattr(args, flag):
            jobs.append((comp, getattr(args, flag), f"--{flag}_save_to", getattr(args, f"{flag}_save_to"),
                         lambda r, c=comp: text_encoder_layout(r, c)))
        elif has[comp]:
            left.append(comp)
    all_inputs = [*args.models, *(j[1] for j in jobs)]
    outs = [prepare_output(save_to, all_inputs, args, flag=flag) for _c, _m, flag, save_to, _l in jobs]
    results = {}
    for (comp, model, _f, _s, layout_of), save_to in zip(jobs, outs, strict=True):
        with open_checkpoint(model) as reader:
            layout = layout_of(reader)
            plan = build_plan(reader, layout, part(comp), allow_unmatched=args.allow_unmatched)
            print(f"{model}: layout {layout.name}; " + "; ".join(plan.summary()), file=sys.stderr)
            if args.verbose > 1:
                for line in plan.details():
                    print("  " + line, file=sys.stderr)
            if plan.unmatched:
                warn(f"{len(plan.unmatched)} module(s) skipped (--allow_unmatched): {plan.unmatched[0]} ...")
            if args.dry_run:
                continue
            meta = dict(reader.metadata)
            if not args.no_metadata:
                merged = [title_of(model, reader.metadata)] + [title_of(i.path, i.lora.metadata) for i in inputs]
                if comp == "transformer":
                    meta.update(modelspec(FAMILY, save_to, lora=False, merged_from=merged))
                meta.update(provenance(SCRIPT, args, args.models))
            result = apply_plan(reader, plan, save_to, metadata=meta, save_dtype=parse_dtype(args.save_precision),
                                compute_dtype=compute_dtype(args), device=device, inputs=all_inputs,
                                overwrite=args.overwrite, measure=True if args.verbose else None,
                                progress=lambda keys, c=comp: progress(keys, desc=f"merging {c}", total=len(keys)))
        results[comp] = result
        report(save_to, result, args.verbose)
    if left:
        # Text-encoder parts with nowhere to go are kept, as an exact (concat) LoRA next to the output.
        side = args.te_lora_save_to or _te_side_path(args.save_to or outs[0])
        warn(f"the LoRAs change {', '.join(TEXT_ENCODERS[c][0] for c in left)} but no checkpoint for it was given "
             f"(--clip_l/--t5xxl): those modules are written as a LoRA to {side}")
        te_inputs = [LoraInput(i.path, replace(i.lora, modules=[m for c in left for m in part_of(i.lora, c).modules]),
                               i.ratio) for i in inputs]
        te_inputs = [i for i in te_inputs if i.lora.modules]
        results["te_lora"] = merge_into_lora(args, te_inputs, "concat", device, side, args.format, label="text encoders")
    return results


def report(save_to: str, result, verbose: int) -> None:
    print(f"saved {save_to}: {len(result.changed)} tensors changed, {result.copied} copied unchanged"
          + (f", {result.cast} cast to --save_precision" if result.cast else ""), file=sys.stderr)
    measured = [s for s in result.changed if s.intended_sq > 0]
    if not measured:
        return  # the engine measures rounding for fp8 outputs, and for every output with -v
    rel = (sum(s.error_sq for s in measured) / sum(s.intended_sq for s in measured)) ** 0.5
    print(f"realized vs intended change: relative error {rel:.3e} over {len(measured)} tensors "
          f"(rounding to the stored dtype, and clamping to its range)", file=sys.stderr)
    if verbose:
        for s in result.worst(10 if verbose > 1 else 5):
            print(f"  {s.key}: relative error {s.relative_error:.3e}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(setup_parser, main)
