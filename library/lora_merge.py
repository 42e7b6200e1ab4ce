"""LoRAs → one LoRA, for merge_lora.py and flux_merge_lora.py without a checkpoint: the plan (inputs,
family, mode, targets, output), the merge — factor space through library.lora_combine, delta space
(flux's `svd` / `*_svd` modes) through library.svd_merge — and the write through library.lora_output.

The plan is made without any maths, so `--dry_run` prints it and stops in a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from library.cli import unused_compute_flags
from library.console import warn
from library.errors import LoraToolsError
from library.lora_combine import Group, LayerReport, combine, concat_elements, concat_rank, group_targets
from library.lora_output import output_dtype, output_format, write_lora
from library.merge_plan import LoraInput
from library.metadata import title_of
from library.methods import DELTA, method, recorded_seed, space_of


@dataclass
class MergeOptions:
    density: float = 1.0
    sign_method: str = "total"
    seed: int = 0
    shuffle: bool = False
    new_rank: int | None = None  # delta-space modes only
    device: object = None
    params: dict = field(default_factory=dict)  # method parameters as MergeContext fields (methods.method_params)

    @classmethod
    def from_args(cls, args, device) -> MergeOptions:
        """flux_merge_lora.py's flags (add_lora_merge_args, --new_rank, the method-parameter flags)."""
        from library.methods import method_params

        return cls(args.density, args.majority_sign_method, args.seed, args.shuffle, args.new_rank, device,
                   method_params(args))


@dataclass
class LoraMergePlan:
    inputs: list[LoraInput]
    family: str
    groups: list[Group]
    mode: str
    fmt: str
    save_to: str | None
    options: MergeOptions = field(default_factory=MergeOptions)

    @property
    def space(self) -> str:
        return space_of(self.mode)

    def lines(self) -> list[str]:
        """What will be done, one line each: inputs, family and mode, targets, output."""
        out = [f"input {i.path}: {i.lora.format}, {len(i.lora.modules)} modules, ratio {i.ratio:g}"
               + (f", block weights {i.block_weights.text}" if i.block_weights is not None else "")
               for i in self.inputs]
        kinds = sorted({t.adapter.kind for g in self.groups for t in g.terms})
        out.append(f"family {self.family}, mode {self.mode} ({self.space} space"
                   f"{', exact' if self.mode == 'concat' else ''}), {len(self.groups)} targets ({', '.join(kinds)})")
        out.append(f"output {self.save_to or '(none)'}, format {self.fmt}")
        return out

    def seed(self) -> int | None:
        """The seed provenance records: only when the run draws from it."""
        return recorded_seed(self.options.seed, mode=self.mode, shuffle=self.options.shuffle,
                             block_weights=[i.block_weights for i in self.inputs],
                             randomized_svd=self.space == DELTA)


# A concat output this much larger than its inputs, and at least this large, is announced before any work:
# stacked ranks and densified LoHa/LoKr deltas can turn a few MB into gigabytes (issue 11 saw 700×).
BIG_RATIO, BIG_BYTES = 50, 100 * 2**20


def size_warning(plan: LoraMergePlan, save_precision: str | None = None) -> str | None:
    """One line when a concat would write far more than its inputs hold (BIG_RATIO× and BIG_BYTES), else None."""
    if plan.mode != "concat":
        return None  # the other modes keep the inputs' (equal) ranks
    itemsize = output_dtype((i.lora for i in plan.inputs), save_precision).itemsize
    out_bytes = sum(concat_elements(g) for g in plan.groups) * itemsize
    in_bytes = sum(os.path.getsize(i.path) for i in plan.inputs if os.path.isfile(i.path))
    if out_bytes < BIG_BYTES or out_bytes < BIG_RATIO * in_bytes:
        return None
    return (f"the concat output will be about {_mb(out_bytes)}, {out_bytes / max(in_bytes, 1):.0f}× its inputs "
            f"({_mb(in_bytes)}): concat stacks every rank and writes dense deltas where no smaller exact form "
            f"exists; svd_merge_lora.py --new_rank N gives a LoRA of the rank you choose")


def concat_notice(plan: LoraMergePlan, save_precision: str | None = None) -> str | None:
    """The line a default concat prints: what it does to rank and size, and the flag for a same-rank LoRA.

    sd-scripts' merge_lora.py writes a LoRA of its inputs' rank by default; our default is the exact concat,
    whose rank is the sum of the inputs' ranks (and whose file grows with it), which a pipeline that
    expects the former has to hear about."""
    if plan.mode != "concat" or len(plan.inputs) < 2:
        return None
    top = [0] * len(plan.inputs)  # each input's largest rank
    for term in (t for g in plan.groups for t in g.terms):
        top[term.slot] = max(top[term.slot], int(term.adapter.rank or 0))
    in_ranks = "+".join(str(r) for r in top)
    out = [r for r in (concat_rank(g) for g in plan.groups) if r is not None]
    out_ranks = f"{min(out)}" if out and min(out) == max(out) else f"{min(out, default=0)}..{max(out, default=0)}"
    itemsize = output_dtype((i.lora for i in plan.inputs), save_precision).itemsize
    out_bytes = sum(concat_elements(g) for g in plan.groups) * itemsize
    in_bytes = sum(os.path.getsize(i.path) for i in plan.inputs if os.path.isfile(i.path))
    return (f"--mode concat (the default) is exact but stacks the ranks: input ranks {in_ranks} -> output rank "
            f"{out_ranks}, about {_mb(out_bytes)} for {_mb(in_bytes)} of inputs. For a LoRA of the inputs' rank, as "
            f"sd-scripts' merge_lora.py writes, pass --mode add (approximate, equal ranks) or use svd_merge_lora.py "
            f"--new_rank N (the optimal truncation); --mode concat says you chose this")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


@dataclass
class MergedLora:
    modules: list
    reports: list[LayerReport]  # factor space: one per target
    results: dict | None = None  # delta space: library.svd_merge results per layer
    summary: str = "exact"  # one line on the error of the result
    layer_lines: list[str] = field(default_factory=list)  # worst first

    def component_line(self, plan: LoraMergePlan, label: str) -> str:
        """flux_merge_lora.py's line: modules per component, mode, format, and how exact the result is."""
        comps = sorted({m.target.component for m in self.modules})
        exactness = self.summary if plan.mode == "concat" or self.results is not None else (
            f"approximate: {self.summary} (the svd modes work in delta space)")
        return (f"{label}: {len(self.modules)} modules ({', '.join(comps)}), mode {plan.mode}, format {plan.fmt}: "
                f"{exactness}")

    def headline(self, plan: LoraMergePlan) -> str:
        """One line: how many inputs became how many modules, mode, rank range, format."""
        ranks = [r.rank for r in self.reports if r.rank is not None]
        return (f"{len(plan.inputs)} {plan.family} LoRA(s) -> {len(self.modules)} modules, mode {plan.mode}, "
                f"rank {min(ranks, default=0)}..{max(ranks, default=0)}, format {plan.fmt}")


def plan_lora_merge(inputs: list[LoraInput], mode: str, fmt: str | None, save_to: str | None,
                    options: MergeOptions | None = None) -> LoraMergePlan:
    method(mode)  # an unknown name fails here, before anything is read twice
    family, groups = group_targets(inputs)
    if not groups:
        raise LoraToolsError("nothing to merge: every module has strength 0")
    options = options or MergeOptions()
    if space_of(mode) == DELTA and options.new_rank is None:
        raise LoraToolsError(f"--mode {mode} needs --new_rank")
    return LoraMergePlan(inputs, family, groups, mode, output_format(fmt, inputs[0].lora), save_to, options)


def run_lora_merge(plan: LoraMergePlan) -> MergedLora:
    opts = plan.options
    if plan.space == DELTA:
        return _delta_merge(plan)
    modules, reports = combine(plan.groups, plan.mode, density=opts.density, sign_method=opts.sign_method,
                               seed=opts.seed, shuffle=opts.shuffle, params=opts.params)
    if plan.mode == "concat":
        return MergedLora(modules, reports)
    errors = [r.relative_error for r in reports if r.kind == "lora"]
    summary = (f"relative error of the merged delta, mean {sum(errors) / max(len(errors), 1):.3g}, "
               f"max {max(errors, default=0):.3g}")
    lines = [f"{r.target}: rank {r.rank}, relative error {r.relative_error:.3e}"
             for r in sorted(reports, key=lambda r: -r.relative_error)]
    return MergedLora(modules, reports, None, summary, lines)


def _delta_merge(plan: LoraMergePlan) -> MergedLora:
    from library.svd_merge import MergeSettings, merge_layers
    from library.svd_merge_io import jobs_from_groups, modules_from_results, summary

    opts = plan.options
    name = method(plan.mode).name
    settings = MergeSettings(mode=name, new_rank=opts.new_rank, density=opts.density, sign_method=opts.sign_method,
                             seed=opts.seed, device=opts.device, **opts.params)
    results = merge_layers(jobs_from_groups(plan.groups, len(plan.inputs)), settings)
    st = summary(results)
    line = (f"relative error vs the exact merged delta: mean {st['relative_error_mean']:.3g}, "
            f"max {st['relative_error_max']:.3g} ({st['worst_layer']})")
    return MergedLora(modules_from_results(plan.groups, results), [], results, line)


def write_merged(plan: LoraMergePlan, merged: MergedLora, *, script: str, args: object, save_precision: str | None,
                 no_metadata: bool = False, overwrite: bool = False):
    """Write the merged LoRA through the one LoRA writer; the first input's metadata is the base."""
    inputs = [i.path for i in plan.inputs]
    return write_lora(plan.save_to, merged.modules, plan.family, plan.fmt,
                      dtype=output_dtype((i.lora for i in plan.inputs), save_precision), script=script, args=args,
                      inputs=inputs, base_metadata=plan.inputs[0].lora.metadata,
                      merged_from=[title_of(i.path, i.lora.metadata) for i in plan.inputs], seed=plan.seed(),
                      minimal=no_metadata, overwrite=overwrite)


def merge_and_write(plan: LoraMergePlan, *, describe: Callable[[MergedLora], None], script: str, args: object,
                    save_precision: str | None, dry_run: bool = False, no_metadata: bool = False,
                    overwrite: bool = False, label: str = "", file: TextIO | None = None,
                    default_mode: bool = False) -> MergedLora | None:
    """What merge_lora.py and flux_merge_lora.py do with a LoRA+LoRA plan: warn before any maths when the
    output would dwarf its inputs, print the plan and stop on --dry_run (None), else merge, let the script
    `describe` the result, write it and say where. Messages go to `file` (stdout by default). `default_mode`:
    the mode was not asked for, so a concat says what it does to rank and size (concat_notice)."""
    file = file or sys.stdout
    if big := size_warning(plan, save_precision):
        warn(big)
    elif default_mode and (notice := concat_notice(plan, save_precision)):
        warn(notice)
    for note in unused_compute_flags(args, "a LoRA+LoRA merge", device_used=plan.space == DELTA):
        warn(note)
    if dry_run:
        print(f"{label}{', ' if label else ''}dry run, nothing written:\n  " + "\n  ".join(plan.lines()), file=file)
        return None
    merged = run_lora_merge(plan)
    describe(merged)
    write_merged(plan, merged, script=script, args=args, save_precision=save_precision, no_metadata=no_metadata,
                 overwrite=overwrite)
    print(f"wrote {plan.save_to}", file=file)
    return merged
