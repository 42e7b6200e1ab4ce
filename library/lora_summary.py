"""What `lora_info.py` reports about a LoRA file, as plain data (printable or JSON)."""

from __future__ import annotations

import os
from collections import Counter

from library.errors import LoraToolsError
from library.metadata import tag_frequency, training_summary
from library.safetensors_io import LazyReader
from networks import adapter_from_tensors


def raw_summary(path: str) -> dict:
    """What can be said from the header alone: key count, dtypes, size, metadata."""
    with LazyReader(path) as reader:
        dtypes = Counter(str(reader.dtype(k)).replace("torch.", "") for k in reader.keys())
        metadata = dict(reader.metadata)
        n_keys = len(reader.keys())
    tags = tag_frequency(metadata)
    return {
        "file": path,
        "file_size_bytes": os.path.getsize(path),
        "tensors": n_keys,
        "dtypes": dict(dtypes),
        "training": training_summary(metadata),
        "top_tags": tags.most_common(10),
        "metadata_keys": sorted(metadata),
    }


def summarize(path: str, family: str | None = None) -> dict:
    """Full report: detection, modules with rank/alpha, conv modules, unmatched keys, plus the raw summary.

    A file that cannot be interpreted still gets its raw summary, with the reason under "error".
    """
    from library.formats import read_lora

    info = raw_summary(path)
    try:
        lora = read_lora(path, family=family, allow_unmatched=True)
    except LoraToolsError as exc:
        info["error"] = str(exc)
        return info
    modules = []
    for module in lora.modules:
        adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
        shape = tuple(module.target.shape)
        modules.append({
            "module": module.source,
            "target": module.target.describe(),
            "type": adapter.kind + ("+dora" if adapter.dora is not None else ""),
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "scale": round(adapter.scale, 6),
            "conv": bool(shape and len(shape) == 4),
            "kernel": list(shape[2:]) if shape and len(shape) == 4 else None,
        })
    info.update({
        "format": lora.format,
        "family": lora.family,
        "modules": len(modules),
        "types": dict(Counter(m["type"] for m in modules)),
        "rank_summary": rank_summary(modules),
        "conv_modules": sum(m["conv"] for m in modules),
        "unmatched_keys": list(lora.unmatched),
        "module_list": modules,
    })
    return info


def rank_summary(modules: list[dict]) -> str:
    """"rank 32, alpha 16 everywhere" or a histogram like "rank 8 ×120, rank 4 ×40"."""
    pairs = Counter((m["rank"], m["alpha"]) for m in modules)
    if not pairs:
        return "no modules"
    if len(pairs) == 1:
        (rank, alpha), _ = pairs.popitem()
        alpha_text = "absent (= rank)" if alpha is None else f"{alpha:g}"
        return f"rank {rank}, alpha {alpha_text} everywhere" if rank is not None else "full/no rank everywhere"
    parts = []
    for (rank, alpha), n in sorted(pairs.items(), key=lambda kv: -kv[1]):
        alpha_text = "-" if alpha is None else f"{alpha:g}"
        parts.append(f"rank {rank if rank is not None else 'full'}/alpha {alpha_text} ×{n}")
    return ", ".join(parts)


def format_text(info: dict, verbose: int = 0) -> str:
    lines = [f"file:        {info['file']}",
             f"size:        {info['file_size_bytes'] / 2**20:.2f} MiB, {info['tensors']} tensors, "
             f"dtypes {', '.join(f'{k} ×{v}' for k, v in info['dtypes'].items())}"]
    if "error" in info:
        lines.append(f"could not interpret this file: {info['error']}")
    else:
        lines += [f"format:      {info['format']}",
                  f"family:      {info['family']}",
                  f"modules:     {info['modules']} ({', '.join(f'{k} ×{v}' for k, v in info['types'].items())}), "
                  f"{info['conv_modules']} conv",
                  f"ranks:       {info['rank_summary']}"]
        if info["unmatched_keys"]:
            shown = ", ".join(info["unmatched_keys"][:20])
            lines.append(f"unmatched:   {len(info['unmatched_keys'])} keys: {shown}")
        if verbose:
            for m in info["module_list"]:
                kernel = f" kernel {m['kernel']}" if m["kernel"] else ""
                lines.append(f"  {m['module']} -> {m['target']}: {m['type']} rank {m['rank']} alpha {m['alpha']}{kernel}")
    if info["training"]:
        lines.append("training:")
        lines += [f"  {k}: {v}" for k, v in info["training"].items()]
    if info["top_tags"]:
        lines.append("top tags:    " + ", ".join(f"{t} ({n})" for t, n in info["top_tags"]))
    return "\n".join(lines)
