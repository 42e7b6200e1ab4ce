"""svd_merge_lora.py (and flux_merge_lora.py's svd modes) between files and the engine: inputs grouped per
canonical target, engine jobs, merged modules back in any output format, and the per-layer report.

Grouping is lora_combine.group_targets (shared with merge_lora.py): inputs must share a family, block
weights multiply the ratios, DoRA is refused, and where files cut one fused weight differently (Flux qkv
in one file, q/k/v in another) every term moves onto the whole weight, zero rows elsewhere (exact).
"""

from __future__ import annotations

import json
import math

import torch

from library.destination import write_text
from library.errors import LoraToolsError
from library.formats.types import Module
from library.lora_combine import Group, Term, _padded
from library.lowrank_engine import LayerResult, summarize
from library.svd_merge import LayerJob, MergeSettings

PRINT_LIMIT = 40  # layer lines printed with -v (-vv prints all)


class PlacedAdapter:
    """An adapter on rows [a, b) of a larger target, seen by the engine as one on the whole target.

    Only what the engine reads: kind, rank, dora, bias_delta, factors(), delta(), describe(). The rows
    outside [a, b) are zero, so factors and delta stay exact; a LoRA's own bias (`lora_up.bias`) gets the
    alpha/rank scale that lora_combine recorded for it.
    """

    def __init__(self, term: Term, total_rows: int):
        self.inner = term.adapter
        self.rows = term.rows
        self.total = total_rows
        self.kind = self.inner.kind
        self.dora = self.inner.dora
        self.name = self.inner.name
        bias = self.inner.bias_delta
        self.bias_delta = None if bias is None else _padded(bias.float().reshape(-1) * term.bias_scale, self.rows,
                                                            total_rows)

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.inner.factors()
        return _padded(up, self.rows, self.total), down

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        part = self.inner.delta((self.rows[1] - self.rows[0], *shape[1:]))
        return _padded(part, self.rows, self.total)

    def describe(self) -> str:
        whole = self.rows == (0, self.total)
        return self.inner.describe() + ("" if whole else f" rows {self.rows[0]}:{self.rows[1]}")


def merge_settings(args) -> MergeSettings:
    """MergeSettings from the flags of cli.add_svd_merge_args (svd_merge_lora.py, merge_grid.py)."""
    from library.cli import compute_dtype, resolve_device, warn
    from library.methods import method_params

    dtype = compute_dtype(args)
    if dtype not in (torch.float32, torch.float64):
        warn(f"--precision {args.precision}: QR/SVD have no half-precision kernels; the maths runs in fp32")
    return MergeSettings(mode=args.mode, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
                         dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param, density=args.density,
                         sign_method=args.majority_sign_method, seed=args.seed, clamp_quantile=args.clamp_quantile,
                         oversample=args.svd_oversample, power_iters=args.svd_power_iters,
                         device=resolve_device(args.device), dtype=dtype, **method_params(args))


def jobs_from_groups(groups: list[Group], n_inputs: int) -> list[LayerJob]:
    jobs = []
    for group in groups:
        total = group.target.shape[0]
        parts = []
        for term in group.terms:
            if len(group.target.shape) < 2 or (term.adapter.kind == "full" and term.adapter.diff is None):
                # Norm / bias-only changes have no matrix to factor: merge_lora.py --mode concat keeps them exactly.
                raise LoraToolsError("this module changes only a bias or a 1-D weight, which has no low-rank form; "
                                     "merge such files with merge_lora.py --mode concat", key=term.source)
            plain = term.rows == (0, total) and term.bias_scale == 1.0
            parts.append((term.slot, term.adapter if plain else PlacedAdapter(term, total), term.weight))
        jobs.append(LayerJob(group.target.describe(), tuple(group.target.shape), parts, n_inputs))
    return jobs


def modules_from_results(groups: list[Group], results: dict[str, LayerResult]) -> list[Module]:
    """Merged LoRA modules on the groups' targets: down, up, alpha (rank·scale, stored as float32) and bias."""
    return [Module(group.target, results[group.target.describe()].tensors, group.target.describe())
            for group in groups]


def summary(results: dict[str, LayerResult]) -> dict:
    return summarize([r.report for r in results.values()])


def layer_line(report: dict) -> str:
    return (f"{report['target']}: rank {report['rank_in']} -> {report['rank_out']}, "
            f"energy retained {report['energy_retained']:.6f}, relative error {report['relative_error']:.3e} "
            f"[{report['route']}]")


def summary_line(stats: dict) -> str:
    return (f"rank {stats['rank_out_min']}..{stats['rank_out_max']}; relative error vs the exact merged delta: "
            f"mean {stats['relative_error_mean']:.3g}, max {stats['relative_error_max']:.3g} ({stats['worst_layer']}); "
            f"energy retained min {stats['energy_retained_min']:.4f}")


def layer_lines(reports: list[dict], verbose: int, limit: int = PRINT_LIMIT) -> list[str]:
    """-v: the first `limit` layers' lines (and how many more); -vv: all of them; none without -v."""
    if not verbose:
        return []
    lines = [layer_line(r) for r in reports]
    if verbose > 1 or len(lines) <= limit:
        return lines
    return lines[:limit] + [f"... and {len(lines) - limit} more (-vv lists all)"]


def write_report(path: str, results: dict[str, LayerResult], stats: dict, extra: dict, **where) -> None:
    """`stats` is `summary(results)`, already computed for the printout; `where`: inputs, overwrite and
    other_outputs for the destination checks (library.destination)."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    layers = [{k: clean(v) for k, v in r.report.items()} for r in results.values()]
    write_text(path, json.dumps({**extra, "summary": stats, "layers": layers}, indent=1, default=str),
               flag="--report", **where)


def write_merged(save_to: str, groups: list[Group], results: dict[str, LayerResult], stats: dict, inputs, family: str,
                 fmt: str, *, mode: str, seed: int, randomized_svd: bool, save_precision: str | None, report: str | None,
                 report_extra: dict, args: object, minimal: bool = False, overwrite: bool = False,
                 script: str = "svd_merge_lora.py", extra: dict | None = None) -> list[Module]:
    """The merged LoRA through the one writer (the seed recorded only when something drew from it), then the
    `--report` JSON, checked against the inputs and the LoRA just written. `args` only feeds provenance;
    `extra` goes over the metadata (a Wan 2.2 expert's name)."""
    from library.lora_output import output_dtype, write_lora
    from library.metadata import title_of
    from library.methods import recorded_seed

    modules = modules_from_results(groups, results)
    paths = [i.path for i in inputs]
    write_lora(save_to, modules, family, fmt, dtype=output_dtype((i.lora for i in inputs), save_precision),
               script=script, args=args, inputs=paths, base_metadata=inputs[0].lora.metadata,
               merged_from=[title_of(i.path, i.lora.metadata) for i in inputs],
               seed=recorded_seed(seed, mode=mode, block_weights=[i.block_weights for i in inputs],
                                  randomized_svd=randomized_svd),
               extra=extra, minimal=minimal, overwrite=overwrite)
    if report:
        write_report(report, results, stats, report_extra, inputs=paths, overwrite=overwrite,
                     other_outputs={"--save_to": save_to})
    return modules
