"""The one LoRA writer: every script that writes a LoRA (merge_lora, flux_merge_lora, svd_merge_lora,
resize_lora, convert_lora, extract_lora_from_models) goes through it, so the rules below hold for all of them.
`write_lora` takes canonical modules and a family format; `write_named_tensors` is its last stage, for
tensors already named by the caller (extract's generic PEFT / ComfyUI names have no family format).

- Format: --format / --to, else that of the first input, else kohya (for inputs we read but do not write).
- Storage dtype without --save_precision: the widest float dtype of the input LoRAs' factor tensors
  (alphas aside), so nothing an input held is rounded: fp16 + fp32 inputs give fp32, and fp16 + bf16
  (neither holds the other) give fp32 too; no float tensor at all gives fp32.
- alpha is stored in float32 whatever the factors' dtype: a summed rank (384) or a merged scale (3.2) is
  not exact in bf16, and alpha sets the scale of a whole module. (extract keeps sd-scripts' alpha in the
  save dtype: its alpha is the rank, rounded by the engine to that dtype before the factors were scaled.)
- Metadata: the first input's, with dims, alphas and modelspec brought up to date (library.metadata);
  `ss_network_dim` / `ss_network_alpha` are read off the modules actually written (rank and alpha
  tensor of each, sd-scripts' meaning), then our provenance, then what the format needs (PEFT config);
  --no_metadata keeps only what a loader needs.
- The kohya hashes `sshs_model_hash` / `sshs_legacy_hash` are those of the bytes written.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from library.formats import WRITE_FORMATS, Module, lora_tensors
from library.formats.peft_alpha import KEY as PEFT_METADATA_KEY
from library.metadata import lora_metadata, minimal_metadata, provenance
from library.safetensors_io import cast_clamped, parse_dtype, save_tensors


@dataclass
class WrittenLora:
    path: str
    metadata: dict[str, str]  # as written, before the writer added the kohya hashes
    n_tensors: int


def output_format(requested: str | None, first) -> str:
    """--format if given, else the first input's format where we write it, else kohya."""
    if requested:
        return requested
    return first.format if first.format in WRITE_FORMATS else "kohya"


def factor_dtypes(loras: Iterable) -> set[torch.dtype]:
    return {t.dtype for lora in loras for m in lora.modules for k, t in m.tensors.items()
            if k != "alpha" and t.is_floating_point()}


def output_dtype(loras: Iterable, save_precision: str | None = None) -> torch.dtype:
    """--save_precision if given, else the widest float dtype of the inputs' factor tensors (see above)."""
    if save_precision:
        return parse_dtype(save_precision)
    dtypes = factor_dtypes(loras)
    if not dtypes:
        return torch.float32
    width = max(d.itemsize for d in dtypes)
    widest = {d for d in dtypes if d.itemsize == width}
    # Two dtypes of one width (fp16/bf16, the fp8 kinds) round each other: float32 holds both.
    return widest.pop() if len(widest) == 1 else torch.float32


def ranks_and_alphas(modules: Iterable[Module]) -> tuple[list[int], list[float]]:
    """Rank and alpha of every low-rank module written (absent alpha means alpha = rank), for ss_network_*."""
    from networks import adapter_from_tensors

    ranks, alphas = [], []
    for m in modules:
        rank = adapter_from_tensors(m.tensors, m.source, dora_axis=m.dora_axis).rank
        if rank is None:
            continue  # full diffs have no rank
        ranks.append(int(rank))
        alphas.append(_shortest_float32(float(m.tensors["alpha"])) if "alpha" in m.tensors else float(rank))
    return ranks, alphas


def _shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 as `value`: an fp32 alpha of 3.2 is written "3.2" in
    ss_network_alpha, not "3.200000047683716"."""
    exact = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == exact:
            return candidate
    return value


def storage_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                    alpha_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Float tensors cast (clamped) to `dtype`, alphas to `alpha_dtype` (float32), integers untouched."""
    out = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            out[key] = value
        elif key.endswith(".alpha") or key == "alpha":
            out[key] = value.to(alpha_dtype)
        else:
            out[key] = cast_clamped(value, dtype).contiguous()
    return out


def write_lora(save_to: str, modules: Sequence[Module], family: str, fmt: str, *, dtype: torch.dtype,
               script: str, args: object, inputs: Sequence[str], base_metadata: Mapping[str, str] | None = None,
               merged_from: Iterable[str] = (), seed: int | None = None, extra: Mapping[str, str] | None = None,
               minimal: bool = False, overwrite: bool = False, notes: list[str] | None = None) -> WrittenLora:
    """Write `modules` as a LoRA of `family` in `fmt` (see module docstring).

    `extra` (e.g. resize's training comment) goes over the updated base metadata; `seed` is recorded
    in provenance (pass it only when something in the run drew from it: library.methods.recorded_seed);
    `notes` receives the format's split/fused module lines.
    """
    tensors, format_meta = lora_tensors(modules, family, fmt, notes)
    ranks, alphas = ranks_and_alphas(modules)
    base = {k: v for k, v in (base_metadata or {}).items() if k != PEFT_METADATA_KEY}
    meta = lora_metadata(base, family=family, ranks=ranks or [0], alphas=alphas or [0], save_to=save_to,
                         merged_from=merged_from, extra=extra)
    return write_named_tensors(save_to, tensors, meta, dtype=dtype, script=script, args=args, inputs=inputs,
                               seed=seed, format_metadata=format_meta, minimal=minimal, overwrite=overwrite)


def write_named_tensors(save_to: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                        dtype: torch.dtype, script: str, args: object, inputs: Sequence[str],
                        hashed: Sequence[str] | None = None, seed: int | None = None,
                        format_metadata: Mapping[str, str] | None = None, minimal: bool = False,
                        overwrite: bool = False, alpha_dtype: torch.dtype = torch.float32) -> WrittenLora:
    """Write tensors under the caller's key names with `metadata` (dims, modelspec: library.metadata), then our
    provenance of the run and `format_metadata` (PEFT config); `minimal` keeps only what a loader needs.

    `inputs` are what the output must never replace (a sharded checkpoint's folder), `hashed` the files whose
    sha256 provenance records (its shards; default `inputs`)."""
    tensors = storage_tensors(tensors, dtype, alpha_dtype)
    meta = dict(metadata)
    if not minimal:  # minimal_metadata would drop it: no need to hash the inputs (checkpoints: gigabytes)
        meta.update(provenance(script, args, inputs if hashed is None else hashed, seed=seed))
    meta.update(format_metadata or {})
    if minimal:
        meta = minimal_metadata(meta)
    path = save_tensors(save_to, tensors, meta, inputs=inputs, overwrite=overwrite, kohya_hashes=True)
    return WrittenLora(path, meta, len(tensors))
