#!/usr/bin/env python
"""Compare LoRAs layer by layer: how alike are their deltas ΔW (alpha/rank scale included)?

    python lora_compare.py a.safetensors b.safetensors
    python lora_compare.py a.safetensors b.safetensors c.safetensors --plot cmp.png --json

For every pair of files (A, B) and every weight both change:
  cosine         ⟨ΔA, ΔB⟩_F / (‖ΔA‖_F ‖ΔB‖_F), in [-1, 1]
  relative_norm  ‖ΔB‖_F / ‖ΔA‖_F
  overlap_out/in ‖U_Aᵀ U_B‖_F² / k over the top-k left (output) / right (input) singular vectors of each
                 delta, k = min(--top_k, the non-zero ranks): the mean squared cosine of the principal
                 angles, 1 = the same subspace, 0 = orthogonal
  sign_conflict  the share of the weight's entries where ΔA and ΔB have opposite signs (ΔA_ij·ΔB_ij < 0;
                 an entry where either is exactly 0 is no conflict), over all out×in entries
Inner products, norms and singular vectors are exact from the factors (LoHa/LoKr through their exact
low-rank form), never an out×in matrix; signs have no factored form, so sign_conflict builds the dense
deltas of one layer at a time, a block of rows at a time. The overall line per pair counts every weight
either file changes (cosine, relative_norm) or both change (sign_conflict). Bias deltas (`diff_b`, `b_norm`,
a LoRA's own `lora_up.bias` times alpha/rank) are rows of their own, keyed `….bias`, and count in the overall
figures like a weight. Strength is not applied; DoRA modules count with their low-rank direction (their final
delta needs the base weight).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from library.cli import add_common_args, positive_int, run_cli
from library.errors import LoraToolsError

METRICS = ("cosine", "relative_norm", "overlap_out", "overlap_in", "sign_conflict")
# Colour scale of each metric on the heat map: (vmin, vmax, colormap).
SCALES = {"cosine": (-1.0, 1.0, "RdBu_r"), "overlap_out": (0.0, 1.0, "viridis"), "overlap_in": (0.0, 1.0, "viridis"),
          "sign_conflict": (0.0, 1.0, "magma"), "relative_norm": (None, None, "viridis")}


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="two or more LoRA files of one model family (any format)")
    parser.add_argument("--family", default=None, help="model family when detection is ambiguous (sd1, sd2, ...)")
    parser.add_argument("--top_k", type=positive_int, default=8,
                        help="singular directions per delta in the subspace overlap (default 8)")
    parser.add_argument("--plot", default=None, metavar="OUT.png",
                        help="write a heat map (layers × pairs of files) of --plot_metric to this PNG (needs matplotlib)")
    parser.add_argument("--plot_metric", default="cosine", choices=METRICS, help="metric of the heat map (default cosine)")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of the table")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot file (never an input)")
    add_common_args(parser, writes=False, device=False, precision=False)
    return parser


def _names(paths: list[str]) -> list[str]:
    """Short labels: file stems, or their positions where two stems are equal."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"{i + 1}:{s}" for i, s in enumerate(stems)]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(pairs: list[dict]) -> str:
    lines = []
    for pair in pairs:
        o = pair["overall"]
        lines.append(f"{pair['a']} ~ {pair['b']}: cosine {_fmt(o['cosine'])}, relative_norm {_fmt(o['relative_norm'])}, "
                     f"sign_conflict {_fmt(o['sign_conflict'])} over {o['shared_layers']} shared layers; "
                     f"only in {pair['a']}: {len(pair['only_in_a'])}, only in {pair['b']}: {len(pair['only_in_b'])}")
    lines.append("")
    width = max([len(row["target"]) for pair in pairs for row in pair["layers"]] + [5])
    header = f"{'layer':<{width}}  {'block':<6}  pair" if len(pairs) > 1 else f"{'layer':<{width}}  {'block':<6}"
    lines.append(header + "".join(f"  {m:>13}" for m in METRICS))
    for pair in pairs:
        label = f"  {pair['a']}~{pair['b']}" if len(pairs) > 1 else ""
        for row in pair["layers"]:
            lines.append(f"{row['target']:<{width}}  {row['block']:<6}{label}" +
                         "".join(f"  {_fmt(row[m]):>13}" for m in METRICS))
    return "\n".join(lines)


def heat_map(pairs: list[dict], metric: str, destination) -> str:
    from library.plots import heatmap

    rows: dict[str, str] = {}  # target -> block, in the order of the first pair that has it
    for pair in pairs:
        for row in pair["layers"]:
            rows.setdefault(row["target"], row["block"])
    if not rows:
        raise LoraToolsError("no weight is changed by two of the files: there is no heat map to draw")
    by_pair = [{row["target"]: row[metric] for row in pair["layers"]} for pair in pairs]
    values = [[scores.get(target) for scores in by_pair] for target in rows]
    many = len(rows) > 60  # label blocks, not layers, when the layer names would not fit
    labels = list(rows.values()) if many else list(rows)
    vmin, vmax, cmap = SCALES[metric]
    return heatmap(values, labels, [f"{p['a']}~{p['b']}" for p in pairs], f"{metric} per layer", destination,
                   vmin=vmin, vmax=vmax, cmap=cmap, colorbar_label=metric, label_changes_only=many)


def main(args: argparse.Namespace) -> list[dict]:
    if len(args.models) < 2:
        raise LoraToolsError(f"lora_compare.py needs at least two LoRA files, {len(args.models)} given")
    destination = None
    if args.plot is not None:  # checked before anything is read
        from library.plots import checked_png

        destination = checked_png(args.plot, args.models, args.overwrite)
    from library.cli import progress
    from library.inputs import read_loras
    from library.lora_stats import compare_pair, target_biases, target_factors

    loras = read_loras(args.models, args.family)
    families = {lora.family for lora in loras}
    if len(families) > 1:
        listed = ", ".join(f"{p} is {lora.family}" for p, lora in zip(args.models, loras))
        raise LoraToolsError(f"the LoRAs are for different model families ({listed})")
    factors = [{**target_factors(lora), **target_biases(lora)} for lora in loras]  # bias deltas: rows of their own
    names = _names(args.models)
    index_pairs = [(i, j) for i in range(len(loras)) for j in range(i + 1, len(loras))]
    pairs = []
    for i, j in progress(index_pairs, desc="pairs", enabled=len(index_pairs) > 1):
        result = compare_pair(factors[i], factors[j], loras[0].family, args.top_k)
        pairs.append({"a": names[i], "b": names[j], "file_a": args.models[i], "file_b": args.models[j], **result})
    if args.json:
        print(json.dumps({"family": loras[0].family, "top_k": args.top_k, "pairs": pairs}, indent=2))
    else:
        print(table(pairs))
    if destination is not None:
        written = heat_map(pairs, args.plot_metric, destination)
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return pairs


if __name__ == "__main__":
    sys.exit(run_cli(setup_parser, main))
