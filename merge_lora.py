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
  concat           exact: ranks are stacked, the result applies Σ ratioᵢ·ΔWᵢ (default)
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
import sys

import torch

from library.block_weights import block_weights_for_models
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
from library.lora_combine import MODES
from library.merge_methods import SIGN_METHODS

PRINT_LIMIT = 20  # per-layer lines printed with -v before "... and N more" (all with -vv)
LOSSY = 0.05  # warn when storage rounding took more than this share of a tensor's delta (fp8 outputs)


def setup_parser() -> argparse.ArgumentParser:
    from library.formats import WRITE_FORMATS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd_model", default=None,
                        help="checkpoint to merge into (.safetensors, .ckpt, or a diffusers shard folder); "
                             "without it the LoRAs are merged into one LoRA")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    parser.add_argument("--models", nargs="+", required=True, help="LoRA files (any format loratools reads)")
    parser.add_argument("--ratios", nargs="*", type=float, default=None,
                        help="strength per model (negative allowed; default 1 each)")
    parser.add_argument("--lbws", nargs="*", default=None,
                        help="block weights per model: a webui lora-block-weight string (17/26 values SD1/SD2, "
                             "12/20 SDXL, 61 Flux), a JSON list (sd-scripts) or a preset name (ALL, INS, IND, "
                             "INALL, MIDD, OUTD, OUTS, OUTALL, NONE, ALL0.5, FLUXALL or your own); '-' for none")
    parser.add_argument("--lbw_presets", default=None, help="toml (NAME = \"1,0,…\") or webui lbwpresets.txt file")
    parser.add_argument("--lbw_x", type=float, default=1.0, help="value of X in block-weight strings (default 1)")
    parser.add_argument("--mode", default="concat", choices=MODES,
                        help="LoRA+LoRA merge mode (default concat: the exact one); see above")
    parser.add_argument("--concat", action="store_true", help="same as --mode concat (sd-scripts flag)")
    parser.add_argument("--shuffle", action="store_true",
                        help="mix the ranks of each merged module with a seeded random orthogonal matrix")
    parser.add_argument("--density", type=float, default=1.0, help="ties/dare/magnitude_prune: share kept (0…1]")
    parser.add_argument("--majority_sign_method", default="total", choices=SIGN_METHODS,
                        help="ties/dare_ties sign election (default total)")
    parser.add_argument("--seed", type=int, default=0, help="seed for DARE masks, --shuffle and R/U block weights")
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


def read_inputs(paths: list[str], family: str | None, allow_unmatched: bool) -> list:
    """The LoRAs, each with its family detected. A file whose family is ambiguous (e.g. SD1/SD2 share
    most shapes) takes `family` (the checkpoint's or --family), else the family of the other inputs."""
    from library.formats import read_lora

    loras: dict[str, object] = {}
    ambiguous: dict[str, LoraToolsError] = {}
    for path in paths:
        try:
            loras[path] = read_lora(path, allow_unmatched=allow_unmatched)
        except LoraToolsError as exc:
            if "ambiguous" not in exc.message:
                raise
            ambiguous[path] = exc
    if ambiguous:
        known = {lora.family for lora in loras.values()}
        fallback = family or (known.pop() if len(known) == 1 else None)
        for path, exc in ambiguous.items():
            if fallback is None:
                raise exc
            try:
                loras[path] = read_lora(path, family=fallback, allow_unmatched=allow_unmatched)
            except LoraToolsError:
                # it fits several families, but not the one of the checkpoint / the other LoRAs
                raise LoraToolsError(f"this LoRA is not for {fallback}, the family of the "
                                     f"{'checkpoint' if family else 'other LoRAs'} ({exc.message})", file=path) from None
    return [loras[p] for p in paths]


def _hint(args: argparse.Namespace) -> str | None:
    flagged = "sdxl" if args.sdxl else "sd2" if args.v2 else None
    if args.sdxl and args.v2:
        raise LoraToolsError("--sdxl and --v2 contradict each other")
    if args.family and flagged and args.family != flagged:
        raise LoraToolsError(f"--{'sdxl' if args.sdxl else 'v2'} contradicts --family {args.family}")
    return args.family or flagged


def choose_layout(reader, args: argparse.Namespace):
    """The checkpoint's family and layout: detected, checked against --sdxl/--v2/--family."""
    from library.formats import FAMILIES, CheckpointLayout
    from library.formats.checkpoint import detect_checkpoint_layout, partial_layout

    hint = _hint(args)
    if args.family and args.family not in FAMILIES:
        raise LoraToolsError(f"unknown --family {args.family!r}; known: {', '.join(FAMILIES)}")
    layout = detect_checkpoint_layout(reader, family=args.family)
    if layout is None:
        if args.family:
            return partial_layout(reader, args.family) or CheckpointLayout(args.family)
        raise LoraToolsError("cannot tell which model family this checkpoint is; pass --family",
                             file=args.sd_model)
    if hint and layout.family.name != hint:
        flag = "--family" if args.family else "--sdxl" if args.sdxl else "--v2"
        raise LoraToolsError(f"{flag} says {hint} but the checkpoint is {layout.family.name}", file=args.sd_model)
    return layout


def _print_lines(lines: list[str], verbose: int) -> None:
    limit = None if verbose > 1 else PRINT_LIMIT
    for line in lines[:limit]:
        print("  " + line)
    if limit is not None and len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more (-vv lists all)")


def merge_into_checkpoint(args: argparse.Namespace, ratios: list[float], block_weights) -> dict:
    from library.checkpoint_apply import apply_plan
    from library.merge_plan import LoraInput, build_plan
    from library.metadata import STALE_ON_WRITE, provenance
    from library.safetensors_io import open_checkpoint, parse_dtype

    save_to = prepare_output(args.save_to, [args.sd_model, *args.models], args)
    device = resolve_device(args.device)
    cdtype = compute_dtype(args)
    save_dtype = parse_dtype(args.save_precision) if args.save_precision else None
    with open_checkpoint(args.sd_model) as reader:
        layout = choose_layout(reader, args)
        family = layout.family.name
        loras = read_inputs(args.models, family, args.allow_unmatched)
        inputs = [LoraInput(p, lora, r, bw) for p, lora, r, bw in zip(args.models, loras, ratios, block_weights)]
        plan = build_plan(reader, layout, inputs, allow_unmatched=args.allow_unmatched)
        print(f"{args.sd_model}: {family} checkpoint ({layout.name})")
        for line in plan.summary():
            print("  " + line)
        for item in plan.unmatched:
            warn(f"skipped (no matching weight): {item}")
        if args.verbose or args.dry_run:
            _print_lines(plan.details(), args.verbose)
        if args.dry_run:
            return {"plan": plan}
        metadata = None
        if not args.no_metadata:
            metadata = {k: v for k, v in getattr(reader, "metadata", {}).items() if k not in STALE_ON_WRITE}
            metadata.update(provenance("merge_lora.py", args, args.models, seed=args.seed))
            metadata["loratools.base_model"] = os.path.basename(args.sd_model)
        result = apply_plan(reader, plan, save_to, metadata=metadata, save_dtype=save_dtype, compute_dtype=cdtype,
                            device=device, inputs=[args.sd_model, *args.models], overwrite=args.overwrite,
                            progress=lambda keys: progress(keys, desc="merge", enabled=sys.stderr.isatty()),
                            measure=True if args.verbose else None)
    print(f"wrote {save_to}: {len(result.changed)} tensors changed, {result.copied} copied bit for bit"
          + (f", {result.cast} cast to {args.save_precision}" if result.cast else ""))
    lossy = [s for s in result.changed if s.relative_error > LOSSY]
    if lossy:
        worst = max(lossy, key=lambda s: s.relative_error)
        warn(f"{len(lossy)} changed tensor(s) lost over {LOSSY:.0%} of their delta to the storage precision "
             f"(worst {worst.key}: {worst.relative_error:.1%}); consider a wider --save_precision")
    if args.verbose:
        _print_lines([f"{s.key}: storage rounding took {s.relative_error:.2e} of the delta"
                      for s in result.worst(len(result.changed))], args.verbose)
    return {"plan": plan, "result": result, "save_to": save_to}


def input_dtype(lora) -> torch.dtype:
    for module in lora.modules:
        for suffix, t in module.tensors.items():
            if suffix != "alpha" and t.is_floating_point():
                return t.dtype
    return torch.float32


def merge_loras(args: argparse.Namespace, ratios: list[float], block_weights) -> dict:
    from library.formats import WRITE_FORMATS, lora_tensors
    from library.lora_combine import combine, group_targets
    from library.merge_plan import LoraInput
    from library.metadata import lora_metadata, minimal_metadata, provenance, title_of
    from library.safetensors_io import cast_clamped, parse_dtype, save_tensors

    mode = "concat" if args.concat else args.mode
    save_to = prepare_output(args.save_to, args.models, args)
    loras = read_inputs(args.models, args.family, args.allow_unmatched)
    inputs = [LoraInput(p, lora, r, bw) for p, lora, r, bw in zip(args.models, loras, ratios, block_weights)]
    family, groups = group_targets(inputs)
    modules, reports = combine(groups, mode, density=args.density, sign_method=args.majority_sign_method,
                               seed=args.seed, shuffle=args.shuffle)
    first = inputs[0].lora
    fmt = args.format or (first.format if first.format in WRITE_FORMATS else "kohya")
    ranks = [r.rank for r in reports if r.rank is not None]
    print(f"{len(inputs)} {family} LoRA(s) -> {len(modules)} modules, mode {mode}, "
          f"rank {min(ranks, default=0)}..{max(ranks, default=0)}, format {fmt}")
    dense = [r for r in reports if r.kind == "diff"]
    if dense:
        warn(f"{len(dense)} weight(s) have LoHa/LoKr/full adapters: written as exact dense diffs")
    if mode != "concat":
        errors = [r.relative_error for r in reports if r.kind == "lora"]
        print(f"  {mode} is approximate: relative error of the merged delta, mean {sum(errors) / len(errors):.3g}, "
              f"max {max(errors):.3g} (concat is exact; svd_merge_lora.py for delta-space modes)")
        if args.verbose:
            _print_lines([f"{r.target}: rank {r.rank}, relative error {r.relative_error:.3e}"
                          for r in sorted(reports, key=lambda r: -r.relative_error)], args.verbose)
    tensors, extra = lora_tensors(modules, family, fmt)
    save_dtype = parse_dtype(args.save_precision) if args.save_precision else input_dtype(first)
    # alphas stay float32: a summed rank (e.g. 384) is not exactly representable in bf16.
    tensors = {k: v if k.endswith(".alpha") or not v.is_floating_point() else cast_clamped(v, save_dtype).contiguous()
               for k, v in tensors.items()}
    seeded = args.shuffle or mode in ("dare_linear", "dare_ties") or any(b is not None for b in block_weights)
    alphas = [r.alpha for r in reports if r.alpha is not None]
    meta = lora_metadata(first.metadata, family=family, ranks=ranks or [0], alphas=alphas or [0], save_to=save_to or "",
                         merged_from=[title_of(p, inp.lora.metadata) for p, inp in zip(args.models, inputs)],
                         extra=provenance("merge_lora.py", args, args.models, seed=args.seed if seeded else None))
    meta.update(extra)
    if args.no_metadata:
        meta = minimal_metadata(meta)
    if args.dry_run:
        return {"modules": modules, "reports": reports}
    save_tensors(save_to, tensors, meta, inputs=args.models, overwrite=args.overwrite, kohya_hashes=True)
    print(f"wrote {save_to}")
    return {"modules": modules, "reports": reports, "save_to": save_to}


def main(args: argparse.Namespace) -> dict:
    from library.checkpoint_apply import one_thread

    with one_thread(resolve_device(args.device).type == "cpu"):
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    check_counts(args.ratios, args.models, "--ratios")
    ratios = args.ratios if args.ratios else [1.0] * len(args.models)
    block_weights = block_weights_for_models(args.lbws, len(args.models), presets_file=args.lbw_presets,
                                             seed=args.seed, x=args.lbw_x)
    if args.sd_model:
        return merge_into_checkpoint(args, ratios, block_weights)
    if args.mode != "concat" and args.concat:
        raise LoraToolsError(f"--concat contradicts --mode {args.mode}")
    return merge_loras(args, ratios, block_weights)


if __name__ == "__main__":
    run_cli(setup_parser, main)
