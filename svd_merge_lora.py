"""Merge several LoRAs into one LoRA of a chosen rank, through an SVD of each merged layer.

    python svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.7 --new_rank 32 --save_to ab.safetensors
    python svd_merge_lora.py --models a.safetensors b.safetensors --mode ties --density 0.5 --new_rank 32 --save_to t.safetensors

Replaces sd-scripts' svd_merge_lora.py (same flags) and ComfyUI Power-Merge's "PM Merge LoRA SVD" node
(`--mode add_svd|ties_svd|dare_linear_svd|dare_ties_svd|magnitude_prune_svd`, `--density`, `--svd_rank`,
`--svd_conv_rank`). Inputs: any format and family loratools reads, of any ranks and layers (LoCon, Tucker,
LoHa, LoKr; DoRA needs the base weight: use merge_lora.py --sd_model).

Per layer, the merged delta M = method(ratioᵢ·ΔWᵢ) is reduced to the requested rank:
- `add` over LoRA/LoCon/LoHa/LoKr inputs (LoHa/LoKr by their exact factors): exact SVD of Σ ratioᵢ·ΔWᵢ from
  the stacked factors (QR + small core SVD), never forming M, batched over layers of equal shape — the
  optimal truncation, error known exactly.
- `ties`, `dare_*`, `magnitude_prune`, `della`, `breadcrumbs` (masks seeded by (--seed, layer, input)):
  M formed per layer, randomized SVD (oversampling, power iterations); the error against M is reported.
  These are dense per layer: each input's out×in delta is formed and ranked entry by entry, so their time
  grows with out·in (ten full Flux LoRAs: minutes on 2 cores for della/breadcrumbs, see README).
- `tsv`, `iso_c`, `iso_cts`, `knots`, `np_lora` (singular-space methods): on the Σr×Σr core, never forming M
  (knots forms only its T·Σr×in aligned coordinates); `add` over LoRAs stays factored too.
No quantile clamp unless asked (--clamp_quantile); output alpha = rank. --ratios auto, --lbws LINES: README.
Wan 2.2 A14B pairs: --high_noise A_hn B_hn --low_noise A_ln B_ln (or --models named for one expert with their
partners next to them) merge each expert alone and write <save_to stem>_high_noise / _low_noise.
"""

from __future__ import annotations

import argparse

# Only torch-free modules at the top, so that --help costs no torch import; the work imports inside main().
from library.cli import add_common_args, add_svd_merge_args, prepare_output, progress, ratio_value, run_cli
from library.lowrank_rules import check_dynamic_flags, check_quantile
from library.wan_pairs import add_pair_args, expert_runs


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="LoRA files (any format loratools reads); Wan 2.2 "
                        "files named …high_noise… / …low_noise… whose partners lie next to them are merged as a pair")
    add_pair_args(parser, many=True)
    parser.add_argument("--ratios", nargs="*", type=ratio_value, default=None,
                        help="strength per model (negative allowed; default 1 each), or auto (inverse delta norms)")
    parser.add_argument("--save_to", default=None, help="output .safetensors")
    add_svd_merge_args(parser)
    parser.add_argument("--report", default=None, help="write per-layer figures and a summary to this JSON file")
    add_common_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    """One merge, or one per Wan 2.2 expert (library.wan_pairs: --high_noise/--low_noise or a pair by name)."""
    runs = expert_runs(args, "models", many=True)
    return merge(args) if runs is None else {e: merge(ns, e) for e, ns in runs.items()}


def merge(args: argparse.Namespace, expert: str | None = None) -> dict:
    from library.block_weights import block_weights_for_models
    from library.checks import refusing_nonfinite
    from library.errors import LoraToolsError
    from library.inputs import lora_inputs, ratios_for
    from library.lora_combine import group_targets
    from library.lora_output import output_format
    from library.svd_merge import merge_layers, uses_factored_route
    from library.svd_merge_io import jobs_from_groups, layer_lines, merge_settings, summary, summary_line, write_merged
    from library.wan_pairs import expert_metadata

    if not args.models:
        raise LoraToolsError("no LoRA given: use --models (or --high_noise / --low_noise for a Wan 2.2 pair)")
    ratios_for(args.ratios, args.models)  # a count that does not match --models: refused before any work
    check_dynamic_flags(args.dynamic_method, args.dynamic_param)
    check_quantile(args.clamp_quantile)
    settings = merge_settings(args)
    save_to = prepare_output(args.save_to, args.models, args)
    block_weights = block_weights_for_models(args.lbws, len(args.models), presets_file=args.lbw_presets,
                                             seed=args.seed, x=args.lbw_x)
    with refusing_nonfinite():  # an SVD of NaN/inf is undefined: refuse, naming the file and tensors
        inputs = lora_inputs(args.models, args.ratios, block_weights, family=args.family,
                             allow_unmatched=args.allow_unmatched)
    extra = expert_metadata(expert, [i.lora for i in inputs])
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
                           report=args.report, report_extra={"models": args.models, "ratios": [i.ratio for i in inputs],
                                                             "mode": settings.mode, "family": family, "format": fmt,
                                                             "save_to": save_to},
                           args=args, minimal=args.no_metadata, overwrite=args.overwrite, extra=extra)
    print(f"wrote {save_to}")
    return {"results": results, "summary": stats, "save_to": save_to, "modules": modules}


if __name__ == "__main__":
    run_cli(setup_parser, main)
