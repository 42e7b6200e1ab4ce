"""What an extraction did, per layer and in sum, as plain data (printed with -v, written with --report)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from library.destination import write_text
from library.extract.layers import ExtractedLayer
from library.stage_clock import StageClock


def layer_entry(result: ExtractedLayer) -> dict:
    task = result.task
    entry = {
        "key": task.key,
        "module": task.name,
        "role": task.role,
        "shape": list(task.shape),
        "norm": result.norm,
        "max_abs_diff": result.max_abs,
        "seconds": round(result.seconds, 4),
    }
    if task.rows is not None:
        entry["rows"] = list(task.rows)
    if result.skipped:
        entry["skipped"] = result.skipped
        return entry
    if result.lowrank is not None:
        # The engine's schema (route, rank_out, alpha, energy_retained, relative_error, σ figures, …).
        entry.update({k: v for k, v in result.lowrank.report.items() if k not in ("target", "shape")})
    else:
        entry["relative_error"] = result.relative_error  # of the stored dtype
        entry["energy_retained"] = result.energy_retained
    return entry


def build_report(results: Sequence[ExtractedLayer], skipped: Sequence[tuple[str, str]], *, only_base: Sequence[str] = (),
                 only_tuned: Sequence[str] = (), settings: dict | None = None) -> dict:
    done = [r for r in results if not r.skipped]
    low = [r for r in done if r.task.role == "lowrank"]
    total_sq = sum(r.norm**2 for r in low)
    error_sq = sum(r.error**2 for r in low)
    summary = {
        "layers_extracted": len(done),
        "low_rank_layers": len(low),
        "full_diff_tensors": len(done) - len(low),
        "layers_without_difference": sum(1 for r in results if r.skipped == "no difference"),
        "layers_below_min_diff": sum(1 for r in results if r.skipped and "min_diff" in r.skipped),
        "keys_not_extracted": len(skipped),
        "keys_only_in_base": len(only_base),
        "keys_only_in_tuned": len(only_tuned),
        "seconds": round(sum(r.seconds for r in results), 3),
    }
    if low:
        retained = [r.energy_retained for r in low]
        summary.update({
            "energy_retained_mean": sum(retained) / len(retained),
            "energy_retained_min": min(retained),
            # Energy-weighted over all low-rank layers: ‖ΔW − LoRA‖² / ‖ΔW‖² summed over layers.
            "overall_relative_error": math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0,
            "ranks": sorted({r.rank for r in low}),
        })
    return {
        "settings": settings or {},
        "summary": summary,
        "layers": [layer_entry(r) for r in results],
        "not_extracted": [{"key": k, "reason": why} for k, why in skipped],
        "only_in_base": list(only_base),
        "only_in_tuned": list(only_tuned),
    }


def format_layer(entry: dict) -> str:
    head = f"{entry['module']:<70} {'x'.join(map(str, entry['shape'])):>16}"
    if "skipped" in entry:
        return f"{head}  skipped: {entry['skipped']}"
    if entry["role"] == "lowrank":
        return (f"{head}  rank {entry['rank_out']:>4}  energy retained {entry['energy_retained']:.4%}  "
                f"relative error {entry['relative_error']:.4g}")
    return f"{head}  {entry['role']} (relative error of the stored dtype {entry['relative_error']:.2g})"


def format_summary(report: dict) -> list[str]:
    s = report["summary"]
    lines = [f"extracted {s['layers_extracted']} layers ({s['low_rank_layers']} low-rank, "
             f"{s['full_diff_tensors']} full differences) in {s['seconds']:.1f} s"]
    if s["low_rank_layers"]:
        lines.append(f"energy retained: mean {s['energy_retained_mean']:.4%}, min {s['energy_retained_min']:.4%}; "
                     f"overall relative error {s['overall_relative_error']:.4g}; ranks {s['ranks']}")
    if s["layers_without_difference"]:
        lines.append(f"note: {s['layers_without_difference']} layers have no difference and were skipped")
    if s["layers_below_min_diff"]:
        names = [e["key"] for e in report["layers"] if "min_diff" in e.get("skipped", "")]
        lines.append(f"{len(names)} layers below --min_diff (applied per layer) were skipped: "
                     + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    if s["keys_not_extracted"]:
        reasons: dict[str, int] = {}
        for item in report["not_extracted"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines.append("not extracted: " + "; ".join(f"{n} × {why}" for why, n in sorted(reasons.items())))
    if s["keys_only_in_base"] or s["keys_only_in_tuned"]:
        lines.append(f"keys in one file only: {s['keys_only_in_base']} in the base, {s['keys_only_in_tuned']} in the "
                     "tuned model (listed in --report)")
    return lines


def format_plan(tasks, skipped, naming: str) -> list[str]:
    """What --dry_run prints: each task (key -> module, role, rank, shape), then the counts."""
    lines = [f"{t.key} -> {t.name} ({t.role}{f' rank {t.rank}' if t.rank else ''}, {'x'.join(map(str, t.shape))})"
             for t in tasks]
    return lines + [f"{len(tasks)} tensors would be extracted ({naming}); {len(skipped)} keys not extracted"]


def format_run(report: dict, clock: StageClock | None = None) -> list[str]:
    """What a run prints: with -v (a stopped `clock`) every layer and the time per stage, then the summary."""
    lines = []
    if clock is not None:
        lines += [format_layer(entry) for entry in report["layers"]]
        iters = [e["power_iters"] for e in report["layers"] if "power_iters" in e]
        if iters:
            # The adaptive rule (--svd_tol) says here how often the measured spectrum let it stop early.
            counts = ", ".join(f"{iters.count(n)} × {n}" for n in sorted(set(iters)))
            lines.append(f"power iterations per layer (adaptive, --svd_tol): {counts}")
        lines += ["time per stage (-v):", *clock.table()]
    return lines + format_summary(report)


def write_report(path: str, report: dict, **where) -> None:
    """`where`: inputs, overwrite and other_outputs for the destination checks (library.destination)."""
    write_text(path, json.dumps(report, indent=1, default=str), flag="--report", **where)
