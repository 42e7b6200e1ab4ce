"""What merge_lora.py and flux_merge_lora.py print: per-layer lines cut at a limit, and after baking LoRAs
into a checkpoint (library.checkpoint_apply's ApplyResult) the tensors changed and copied, the
realized-vs-intended error of the changes where it was measured, and a warning for changes the storage
precision mostly took.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from library.console import warn

if TYPE_CHECKING:  # no torch at import: the scripts' --help imports this module
    from library.checkpoint_apply import ApplyResult

PRINT_LIMIT = 20  # lines printed with -v before "... and N more" (all with -vv)
LOSSY = 0.05  # warn when storage rounding took more than this share of a tensor's delta (fp8 outputs)


def print_lines(lines: list[str], verbose: int, file: TextIO | None = None) -> None:
    """Indented lines, cut at PRINT_LIMIT unless -vv."""
    limit = None if verbose > 1 else PRINT_LIMIT
    for line in lines[:limit]:
        print("  " + line, file=file or sys.stdout)
    if limit is not None and len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more (-vv lists all)", file=file or sys.stdout)


def report_lines(save_to: str, result: ApplyResult, verbose: int, cast_label: str) -> tuple[list[str], list[str]]:
    """(lines, warnings) after a bake: what changed and was copied, the realized-vs-intended error where it
    was measured (8-bit outputs always, every output with -v), and tensors that lost over LOSSY."""
    lines = [f"wrote {save_to}: {len(result.changed)} tensors changed, {result.copied} copied bit for bit"
             + (f", {result.cast} cast to {cast_label}" if result.cast else "")]
    warnings = []
    measured = [s for s in result.changed if s.intended_sq > 0]
    if measured:
        rel = (sum(s.error_sq for s in measured) / sum(s.intended_sq for s in measured)) ** 0.5
        lines.append(f"realized vs intended change: relative error {rel:.3e} over {len(measured)} tensors "
                     f"(rounding to the stored dtype, and clamping to its range)")
    lossy = [s for s in result.changed if s.relative_error > LOSSY]
    if lossy:
        worst = max(lossy, key=lambda s: s.relative_error)
        warnings.append(f"{len(lossy)} changed tensor(s) lost over {LOSSY:.0%} of their delta to the storage "
                        f"precision (worst {worst.key}: {worst.relative_error:.1%}); consider a wider --save_precision")
    if verbose and measured:
        lines += [f"  {s.key}: storage rounding took {s.relative_error:.2e} of the delta"
                  for s in result.worst(len(result.changed) if verbose > 1 else PRINT_LIMIT)]
    return lines, warnings


def print_report(save_to: str, result: ApplyResult, verbose: int, cast_label: str, file: TextIO | None = None) -> None:
    """report_lines printed (to `file`, default stdout) and its warnings warned."""
    lines, warnings = report_lines(save_to, result, verbose, cast_label)
    print("\n".join(lines), file=file or sys.stdout)
    for message in warnings:
        warn(message)


def print_bake_plan(model: str, layout, plan, verbose: int, dry_run: bool) -> None:
    """merge_lora.py before a bake: the checkpoint's family and layout, the plan's summary, modules skipped
    (--allow_unmatched), and with -v or --dry_run which module changes which weight."""
    print(f"{model}: {layout.family.name} checkpoint ({layout.name})")
    print("\n".join("  " + line for line in plan.summary()))
    for item in plan.unmatched:
        warn(f"skipped (no matching weight): {item}")
    if verbose or dry_run:
        print_lines(plan.details(), verbose)


def print_lora_merge(plan, merged, verbose: int) -> None:
    """merge_lora.py after a LoRA+LoRA merge: the headline, dense diffs written, and how approximate a
    factor-space mode was (per layer with -v)."""
    print(merged.headline(plan))
    if dense := [r for r in merged.reports if r.kind == "diff"]:
        warn(f"{len(dense)} weight(s) have LoHa/LoKr/full adapters: written as exact dense diffs")
    if plan.mode != "concat":
        print(f"  {plan.mode} is approximate: {merged.summary} (concat is exact; svd_merge_lora.py for delta-space "
              f"modes)")
        if verbose:
            print_lines(merged.layer_lines, verbose)
