"""What `lora_info.py` reports about a LoRA file, as plain data (printable or JSON)."""

from __future__ import annotations

import json
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
    dirs = dataset_dirs(metadata)
    return {
        "file": path,
        "file_size_bytes": os.path.getsize(path),
        "tensors": n_keys,
        "dtypes": dict(dtypes),
        "training": training_summary(metadata),
        "top_tags": tags.most_common(10),
        "tags": training_tags(tags, dirs),
        "dataset_dirs": dirs,
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
    from library.lora_stats import adapter_norm, block_norms, block_of

    modules = []
    for module in lora.modules:
        adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
        shape = tuple(module.target.shape)
        modules.append({
            "module": module.source,
            "target": module.target.describe(),
            "block": block_of(lora.family, module.target.key),
            "norm": adapter_norm(adapter),
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
        "blocks": block_norms(lora, modules),
    })
    return info


def dataset_dirs(metadata: dict[str, str]) -> list[dict]:
    """kohya's `ss_dataset_dirs` ({"10_mychar": {"n_repeats": 10, "img_count": 25}}) as a list; `token` is
    the folder name without kohya's "<repeats>_" prefix: the instance/class words the images were trained on."""
    try:
        data = json.loads(metadata.get("ss_dataset_dirs") or "{}")
    except json.JSONDecodeError:
        return []
    out = []
    for name, entry in (data.items() if isinstance(data, dict) else ()):
        entry = entry if isinstance(entry, dict) else {}
        head, sep, rest = name.partition("_")
        out.append({"dir": name, "token": rest.strip() if sep and head.isdigit() else name.strip(),
                    "repeats": entry.get("n_repeats"), "images": entry.get("img_count")})
    return out


def training_tags(tags: Counter, dirs: list[dict]) -> list[list]:
    """[tag, count] most frequent first (ties by name): `ss_tag_frequency` summed over datasets; a file
    without it (DreamBooth-style captions-free training) gets its dataset folders' tokens, counted by images."""
    if not tags:
        tags = Counter()
        for d in dirs:
            if d["token"]:
                tags[d["token"]] += int(d["images"]) if isinstance(d["images"], (int, float)) else 0
    return [[tag, n] for tag, n in sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))]


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


def format_text(info: dict, verbose: int = 0, tags: bool = False) -> str:
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
            lines.append("blocks:      " + ", ".join(f"{b['block']} ‖ΔW‖ {b['norm']:.4g}" for b in info["blocks"]))
            for m in info["module_list"]:
                kernel = f" kernel {m['kernel']}" if m["kernel"] else ""
                lines.append(f"  {m['module']} -> {m['target']}: {m['type']} rank {m['rank']} alpha {m['alpha']}"
                             f"{kernel} ‖ΔW‖ {m['norm']:.4g}")
    if info["training"]:
        lines.append("training:")
        lines += [f"  {k}: {v}" for k, v in info["training"].items()]
    if tags:
        lines.append(f"tags ({len(info['tags'])}, most frequent first):")
        lines += [f"  {n:>6}  {t}" for t, n in info["tags"]] or ["  (no ss_tag_frequency or ss_dataset_dirs)"]
        lines += [f"  dataset dir {d['dir']}: {d['images']} images × {d['repeats']} repeats" for d in info["dataset_dirs"]]
    elif info["top_tags"]:
        lines.append("top tags:    " + ", ".join(f"{t} ({n})" for t, n in info["top_tags"]))
    return "\n".join(lines)


def plot_summary(info: dict, where) -> str:
    """Per-block and per-layer bar charts of ‖ΔW‖_F, rank and alpha (one PNG, `where` as in library.plots)."""
    from library.plots import BarPanel, bar_chart

    blocks, layers = info["blocks"], info["module_list"]
    names = [b["block"] for b in blocks]
    layers = sorted(layers, key=lambda m: (names.index(m["block"]), m["target"]))
    groups = [m["block"] for m in layers]
    labels = [m["target"] for m in layers]
    alpha = [m["alpha"] if m["alpha"] is not None else m["rank"] for m in layers]
    panels = [BarPanel("‖ΔW‖_F per block", names, [b["norm"] for b in blocks], "Frobenius norm"),
              BarPanel("‖ΔW‖_F per layer", labels, [m["norm"] for m in layers], "Frobenius norm", groups),
              BarPanel("mean rank per block", names, [b["mean_rank"] for b in blocks], "rank"),
              BarPanel("rank per layer", labels, [m["rank"] for m in layers], "rank", groups),
              BarPanel("mean alpha per block", names, [b["mean_alpha"] for b in blocks], "alpha"),
              BarPanel("alpha per layer", labels, alpha, "alpha", groups)]
    title = f"{os.path.basename(info['file'])} ({info['family']}, {info['modules']} modules)"
    return bar_chart(panels, title, where, columns=2)
