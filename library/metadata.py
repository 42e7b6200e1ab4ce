"""Metadata of LoRA files: the `ss_*` keys of sd-scripts, `modelspec.*`, and our provenance.

Outputs keep their input's metadata, update what changed (dims, alphas, architecture, title) and
record what we did under `loratools.*` keys. The kohya hashes `sshs_model_hash` and
`sshs_legacy_hash` are computed by the writer from the bytes actually written
(`StreamingWriter(kohya_hashes=True)`), never before a dtype cast as sd-scripts' merge_lora does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping

from library import __version__
from library.formats.registry import FAMILIES

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
PROVENANCE_PREFIX = "loratools."

# Per-family ss_* / modelspec values are family facts (`Family.metadata` in library.formats); these
# tables keep the old names. Model variants that are no family of ours keep their architecture here.
_FACTS = {name: fam.metadata for name, fam in FAMILIES.items()}
ARCHITECTURES = {**{n: f.architecture for n, f in _FACTS.items() if f.architecture},
                 "sd2_v": "stable-diffusion-v2-768-v", "flux1_schnell": "flux-1-schnell", "chroma": "chroma",
                 "hunyuan_video": "hunyuan-video"}
IMPLEMENTATIONS = {n: f.implementation for n, f in _FACTS.items() if f.implementation}
BASE_MODEL_VERSIONS = {n: f.base_model_version for n, f in _FACTS.items() if f.base_model_version}
RESOLUTIONS = {n: f.resolution for n, f in _FACTS.items() if f.resolution}

# What a merge/resize invalidates: training statistics describe the old weights, not ours.
STALE_ON_WRITE = HASH_KEYS + ("modelspec.hash_sha256",)


def network_dim_summary(values: Iterable[float]) -> str:
    """`ss_network_dim`/`ss_network_alpha` value: the number when all modules agree, else "Dynamic"."""
    distinct = {float(v) for v in values}
    if not distinct:
        return "0"
    if len(distinct) > 1:
        return "Dynamic"
    value = distinct.pop()
    return str(int(value)) if value.is_integer() else repr(value)


def title_of(path: str, metadata: Mapping[str, str] | None = None) -> str:
    if metadata and metadata.get("modelspec.title"):
        return metadata["modelspec.title"]
    return os.path.splitext(os.path.basename(path))[0]


def lora_metadata(base: Mapping[str, str] | None, *, family: str | None, ranks: Iterable[float],
                  alphas: Iterable[float], save_to: str, merged_from: Iterable[str] = (),
                  network_module: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata for a LoRA we write: the base's keys, with dims, architecture and title brought up to date."""
    meta = {k: v for k, v in (base or {}).items() if k not in STALE_ON_WRITE}
    meta["ss_network_dim"] = network_dim_summary(ranks)
    meta["ss_network_alpha"] = network_dim_summary(alphas)
    if network_module:
        meta["ss_network_module"] = network_module
    elif "ss_network_module" not in meta:
        meta["ss_network_module"] = _FACTS[family].network_module if family in _FACTS else "networks.lora"
    if family in BASE_MODEL_VERSIONS and "ss_base_model_version" not in meta:
        meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[family]
    if family in _FACTS and _FACTS[family].v2 is not None:
        meta.setdefault("ss_v2", str(_FACTS[family].v2))
    meta.update(modelspec(family, save_to, lora=True, merged_from=merged_from))
    meta.update(extra or {})
    return meta


def modelspec(family: str | None, save_to: str, *, lora: bool, merged_from: Iterable[str] = ()) -> dict[str, str]:
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": os.path.splitext(os.path.basename(save_to))[0],
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.implementation_version": f"loratools/{__version__}",
    }
    if family in ARCHITECTURES:
        spec["modelspec.architecture"] = ARCHITECTURES[family] + ("/lora" if lora else "")
    if family in IMPLEMENTATIONS:
        spec["modelspec.implementation"] = IMPLEMENTATIONS[family]
    if family in RESOLUTIONS:
        spec["modelspec.resolution"] = RESOLUTIONS[family]
    merged = [m for m in merged_from if m]
    if merged:
        spec["modelspec.merged_from"] = ", ".join(merged)
    return spec


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a whole file, streamed; cached per (path, size, mtime) within one process."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


def input_keys(paths: Iterable[str]) -> dict[str, str]:
    """Provenance key -> path: the file name, or where two different files share a name (the base's and the
    tuned model's `diffusion_pytorch_model-00001-of-00002.safetensors`) the fewest trailing path components
    that tell them apart (`base/unet/…`, `tuned/unet/…`), so that no input's hash overwrites another's."""
    unique = list(dict.fromkeys(os.path.normpath(os.path.abspath(os.fspath(p))) for p in paths))
    parts = {p: p.split(os.sep) for p in unique}
    depth = dict.fromkeys(unique, 1)
    while True:
        keys = {p: "/".join(parts[p][-depth[p]:]) for p in unique}
        clashes: dict[str, list[str]] = {}
        for p, key in keys.items():
            clashes.setdefault(key, []).append(p)
        grow = [p for group in clashes.values() if len(group) > 1 for p in group if depth[p] < len(parts[p])]
        if not grow:
            return {key: p for p, key in keys.items()}
        for p in grow:
            depth[p] += 1


def provenance(script: str, args: object, inputs: Iterable[str], *, seed: int | None = None,
               hashes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our own record of how a file was made: tool version, parameters, inputs' sha256, seed. `hashes`
    (absolute path → sha256) gives digests already known (a merge hashes its inputs while reading them)."""
    digest = file_sha256 if hashes is None else (lambda p: hashes[os.path.abspath(p)])
    params = {k: v for k, v in vars(args).items() if k not in ("debug", "verbose", "overwrite", "dry_run")} \
        if args is not None else {}
    meta = {
        PROVENANCE_PREFIX + "version": __version__,
        PROVENANCE_PREFIX + "script": script,
        PROVENANCE_PREFIX + "parameters": json.dumps(params, default=str, sort_keys=True),
        PROVENANCE_PREFIX + "inputs": json.dumps({key: digest(p) for key, p in input_keys(inputs).items()},
                                                 sort_keys=True),
    }
    if seed is not None:
        meta[PROVENANCE_PREFIX + "seed"] = str(seed)
    return meta


def checkpoint_metadata(base: Mapping[str, str], *, script: str, args: object, inputs: Iterable[str],
                        seed: int | None = None, extra: Mapping[str, str] | None = None,
                        hashes: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata of a checkpoint we merged LoRAs into: the checkpoint's own, without the hashes that
    described the old weights, then `extra` (modelspec, base model name) and our provenance."""
    meta = {k: v for k, v in base.items() if k not in STALE_ON_WRITE}
    meta.update(extra or {})
    meta.update(provenance(script, args, inputs, seed=seed, hashes=hashes))
    return meta


def minimal_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """What `--no_metadata` keeps: only what a loader needs to apply the file correctly."""
    keep = ("ss_network_dim", "ss_network_alpha", "ss_network_module", "lora_adapter_metadata", "format")
    return {k: v for k, v in meta.items() if k in keep}


def tag_frequency(metadata: Mapping[str, str]) -> Counter:
    """Tags and counts summed over datasets from `ss_tag_frequency` ({dataset: {tag: count}})."""
    counts: Counter = Counter()
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return counts
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return counts
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[tag.strip()] += int(n)
    return counts


TRAINING_KEYS = (
    "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_args", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
    "ss_num_train_images", "ss_num_epochs", "ss_epoch", "ss_steps", "ss_max_train_steps", "ss_batch_size_per_device",
    "ss_resolution", "ss_mixed_precision", "ss_seed", "ss_training_started_at", "ss_training_finished_at",
    "ss_training_comment", "ss_output_name", "modelspec.architecture", "modelspec.title",
)


def training_summary(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: metadata[k] for k in TRAINING_KEYS if k in metadata}
