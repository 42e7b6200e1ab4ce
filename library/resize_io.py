"""resize_lora.py between the file and library/resize.py: jobs from a LoRA's modules (with DoRA base weights),
the resized modules back, sd-scripts' training comment, and the summary lines."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from library.errors import LoraToolsError
from library.exact_lowrank import exact_rank
from library.resize import ResizeJob, ResizeSettings, is_removed, resize_rank_cap
from library.safetensors_io import open_checkpoint
from networks import adapter_from_tensors


def plan(modules, base_model: str | None) -> tuple[list[ResizeJob], list]:
    """One job per module with a weight delta; modules with only a bias change pass through unchanged."""
    jobs, passthrough = [], []
    base = open_checkpoint(base_model) if base_model else None
    try:
        for module in modules:
            adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
            if adapter.kind == "full" and "diff" not in module.tensors and "w_norm" not in module.tensors:
                passthrough.append(module)
                continue
            weight = base_weight(base, module, base_model) if adapter.dora is not None and base else None
            jobs.append(ResizeJob(module.source, tuple(module.target.shape), adapter, weight))
    finally:
        if base is not None:
            base.close()
    return jobs, passthrough


def base_weight(reader, module, path: str) -> torch.Tensor:
    """The base weight a DoRA module applies to: its canonical key (and row slice) in --base_model."""
    key = module.target.key
    if key not in reader:
        raise LoraToolsError(f"base model has no weight {key!r} for DoRA module {module.source}", file=path, key=key)
    weight = reader.get(key)
    if module.target.rows:
        weight = weight[module.target.rows[0]:module.target.rows[1]]
    if tuple(weight.shape) != tuple(module.target.shape):
        raise LoraToolsError(f"base weight shape {tuple(weight.shape)} differs from the LoRA's "
                             f"{tuple(module.target.shape)}", file=path, key=key)
    return weight


def kept_as_they_are(jobs: Sequence[ResizeJob], settings: ResizeSettings) -> str | None:
    """The warning for a fixed-rank resize that leaves layers unchanged in rank (a rank is never raised),
    e.g. `--new_rank 32` on a rank-16 file; None when every resized layer gets smaller."""
    if settings.dynamic_method is not None:
        return None  # a dynamic rule may still lower them: the cap is only a cap
    kept = [job for job in jobs if not is_removed(job, settings)]
    # The rank of the delta (LoHa/LoKr: r₁·r₂ of their exact form), not the stored factors' dim.
    low = [job for job in kept if exact_rank(job.adapter) and exact_rank(job.adapter) <= resize_rank_cap(job.shape, settings)]
    if not low:
        return None
    ranks = sorted({int(exact_rank(job.adapter)) for job in low})
    target = f"--new_rank {settings.new_rank}" + (f" / --new_conv_rank {settings.new_conv_rank}"
                                                  if settings.new_conv_rank is not None else "")
    return (f"{target}: {len(low)} of {len(kept)} layers have rank {', '.join(map(str, ranks))}; ranks already at or "
            "below the target are kept as they are")


def resized_modules(modules, results: Mapping, passthrough: list) -> list:
    """The output modules: each resized layer in its input module's type and target, then the passthroughs."""
    by_source = {m.source: m for m in modules}
    return [type(by_source[name])(by_source[name].target, r.tensors, name) for name, r in results.items()] + passthrough


def resize_comment(metadata: Mapping[str, str], old_ranks: Sequence[int], params: Mapping) -> dict[str, str]:
    """sd-scripts' training comment (what the resize did, before the input's own comment) and our record.

    `params`: new_rank, new_conv_rank, dynamic_method, dynamic_param, remove_conv_dims, remove_linear_dims, seed."""
    old = max(old_ranks) if old_ranks else 0
    if params["dynamic_method"]:
        comment = f"Dynamic resize with {params['dynamic_method']}: {params['dynamic_param']} from {old}; "
    else:
        conv = f" (conv: {params['new_conv_rank']})" if params["new_conv_rank"] else ""
        comment = f"dimension is resized from {old} to {params['new_rank']}{conv}; "
    return {"ss_training_comment": comment + metadata.get("ss_training_comment", ""),
            "loratools.resize": json.dumps(dict(params), sort_keys=True)}


def layer_line(r: dict) -> str:
    return (f"{r['target']}: rank {r['rank_in']} -> {r['rank_out']}, fro retained {r['fro_retained']:.4f}, "
            f"relative error {r['relative_error']:.4f}, max(S) ratio {r['max_sv_ratio']:.3g} [{r['type']}, {r['route']}]")


def summary_line(summary: dict) -> str | None:
    if not summary.get("layers"):
        return None
    return (f"resized {summary['layers']} layers to ranks {summary['ranks'][0]}..{summary['ranks'][-1]}: "
            f"fro retained mean {summary['fro_retained_mean']:.4f}, min {summary['fro_retained_min']:.4f}; "
            f"file {summary['file_size_before']:,} -> {summary['file_size_after']:,} bytes")


def write_report(path: str, model: str, save_to: str, summary: dict, layers: list, **where) -> None:
    """`where`: inputs, overwrite and other_outputs for the destination checks (library.destination)."""
    from library.destination import write_text

    write_text(path, json.dumps({"input": model, "output": save_to, "summary": summary, "layers": layers}, indent=1),
               flag="--report", **where)
