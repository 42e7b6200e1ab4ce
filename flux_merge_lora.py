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
from library.flux_combine import MODES, CombineSettings, combine, shuffle
from library.flux_merge import (
    FAMILY,
    TEXT_ENCODERS,
    Weighted,
    apply_to_checkpoint,
    flux_layout,
    read_flux_lora,
    text_encoder_layout,
    weighted_modules,
)
from library.formats import WRITE_FORMATS, save_lora
from library.metadata import lora_metadata, minimal_metadata, modelspec, provenance, title_of
from library.safetensors_io import open_checkpoint, parse_dtype

SCRIPT = "flux_merge_lora.py"


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


def main(args: argparse.Namespace) -> None:
    ratios = _ratios(args)
    into_model = any((args.flux_model, args.clip_l, args.t5xxl))
    mode = _mode(args)
    if into_model and (args.mode or args.shuffle):
        raise LoraToolsError("--mode/--concat/--shuffle are for merging LoRAs into one LoRA (without --flux_model)")
    for flag, out in (("clip_l", "clip_l_save_to"), ("t5xxl", "t5xxl_save_to")):
        if bool(getattr(args, flag)) != bool(getattr(args, out)):
            raise LoraToolsError(f"--{flag} and --{out} go together")
    device = resolve_device(args.working_device)
    loras = [read_flux_lora(path, args.allow_unmatched) for path in progress(args.models, desc="reading LoRAs")]
    for lora in loras:
        print(f"{lora.path}: {lora.format}, {len(lora.modules)} modules", file=sys.stderr)
        if lora.unmatched:
            warn(f"{lora.path}: {len(lora.unmatched)} keys match nothing and are skipped (--allow_unmatched)")
    items = weighted_modules(loras, ratios)
    if into_model:
        merge_into_models(args, loras, items, device)
    else:
        merge_into_lora(args, loras, items, mode, device)


def merge_into_lora(args, loras, items: list[Weighted], mode: str, device) -> None:
    save_to = prepare_output(args.save_to, args.models, args)
    settings = CombineSettings(mode, args.new_rank, args.density, args.majority_sign_method, args.seed, device)
    modules = combine(items, FAMILY, settings, len(loras), progress=progress)
    if args.shuffle:
        modules = shuffle(modules, args.seed)
    ranks = [int(m.tensors["lora_down.weight"].shape[0]) for m in modules if "lora_down.weight" in m.tensors]
    alphas = [float(m.tensors["alpha"]) for m in modules if "alpha" in m.tensors]
    comps = sorted({m.target.component for m in modules})
    print(f"{len(modules)} merged modules ({', '.join(comps)}), mode {mode}, format {args.format}", file=sys.stderr)
    if args.dry_run:
        return
    meta = lora_metadata(loras[0].metadata, family=FAMILY, ranks=ranks, alphas=alphas, save_to=save_to,
                         merged_from=[title_of(lo.path, lo.metadata) for lo in loras])
    meta.update(provenance(SCRIPT, args, args.models, seed=args.seed if args.shuffle or "dare" in mode else None))
    if args.no_metadata:
        meta = minimal_metadata(meta)
    save_lora(save_to, modules, family=FAMILY, fmt=args.format, metadata=meta,
              save_dtype=parse_dtype(args.save_precision), inputs=args.models, overwrite=args.overwrite)
    print(f"saved {save_to}", file=sys.stderr)


def _te_side_path(save_to: str) -> str:
    stem, _ext = os.path.splitext(save_to)
    return stem + "_te_lora.safetensors"


def merge_into_models(args, loras, items: list[Weighted], device) -> None:
    by_comp: dict[str, list[Weighted]] = {}
    for w in items:
        by_comp.setdefault("transformer" if w.module.target.component not in TEXT_ENCODERS else
                           w.module.target.component, []).append(w)
    jobs = []  # (label, model path, save_to, items, layout function)
    if by_comp.get("transformer") and not args.flux_model:
        raise LoraToolsError("the LoRAs change the Flux transformer but no --flux_model was given")
    if args.flux_model:
        jobs.append(("transformer", args.flux_model, args.save_to, by_comp.get("transformer", []), flux_layout))
    left = []
    for comp, (flag, _prefix) in TEXT_ENCODERS.items():
        model = getattr(args, flag)
        if model:
            jobs.append((flag, model, getattr(args, f"{flag}_save_to"), by_comp.get(comp, []),
                         lambda r, c=comp: text_encoder_layout(r, c)))
        elif by_comp.get(comp):
            left.extend(by_comp[comp])
    inputs = [*args.models, *(j[1] for j in jobs)]
    outs = [prepare_output(save_to, inputs, args, flag=f"--{'save_to' if label == 'transformer' else label + '_save_to'}")
            for label, _m, save_to, _i, _l in jobs]
    te_out = None
    if left:
        te_out = prepare_output(args.te_lora_save_to or _te_side_path(args.save_to or outs[0]), inputs, args,
                                flag="--te_lora_save_to")
        warn(f"{len(left)} text-encoder modules have no --clip_l/--t5xxl to go into: they are written as a LoRA "
             f"to {te_out}")
    dtype = parse_dtype(args.save_precision)
    for (label, model, _s, group, layout_of), save_to in zip(jobs, outs, strict=True):
        with open_checkpoint(model) as reader:
            layout = layout_of(reader)
            print(f"{model}: {label} checkpoint, layout {layout.name}, {len(group)} modules to merge", file=sys.stderr)
            if args.dry_run:
                continue
            meta = dict(reader.metadata)
            if not args.no_metadata:
                merged = [title_of(model, reader.metadata)] + [title_of(lo.path, lo.metadata) for lo in loras]
                if label == "transformer":
                    meta.update(modelspec(FAMILY, save_to, lora=False, merged_from=merged))
                meta.update(provenance(SCRIPT, args, [*args.models]))
            stats = apply_to_checkpoint(reader, layout, group, save_to, metadata=meta, save_dtype=dtype,
                                        compute_dtype=compute_dtype(args), device=device,
                                        allow_unmatched=args.allow_unmatched, inputs=inputs, overwrite=args.overwrite,
                                        progress=progress)
        report(label, save_to, stats, args.verbose)
    if te_out and not args.dry_run:
        modules = combine(left, FAMILY, CombineSettings("concat"), len(loras))
        save_lora(te_out, modules, family=FAMILY, fmt=args.format, inputs=inputs, overwrite=args.overwrite,
                  metadata=lora_metadata(None, family=FAMILY, ranks=[m.tensors["lora_down.weight"].shape[0]
                                         for m in modules if "lora_down.weight" in m.tensors],
                                         alphas=[], save_to=te_out))
        print(f"saved {te_out}", file=sys.stderr)


def report(label: str, save_to: str, stats, verbose: int) -> None:
    print(f"saved {save_to}: {len(stats.changed)} tensors changed, {stats.copied} copied unchanged", file=sys.stderr)
    if stats.skipped:
        warn(f"{len(stats.skipped)} targets not in the {label} checkpoint were skipped: {', '.join(stats.skipped[:5])}")
    print(f"realized vs intended change: relative error {stats.relative_error:.3e} (rounding to the stored dtype)"
          + (f", {stats.clamped} values clamped to the dtype's range" if stats.clamped else ""), file=sys.stderr)
    if verbose:
        for key, err in stats.worst(10 if verbose > 1 else 5):
            print(f"  {key}: relative error {err:.3e}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(setup_parser, main)
