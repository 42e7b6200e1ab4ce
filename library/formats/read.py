"""Reading any supported LoRA file into canonical modules."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from library.checks import NonFiniteTracker
from library.errors import LoraToolsError
from library.formats import cloneofsimo
from library.formats.family import Family
from library.formats.match import FileMatch, detect, format_of, io_dims
from library.formats.peft_alpha import PeftAlphas
from library.formats.regroup import swap_halves
from library.formats.types import LoraFile, Module, Target
from library.formats.variants import variant_of
from library.safetensors_io import load_tensors
from networks import WINDOW_SUFFIX
from networks.base import DoraMagnitude
from networks.validate import check_module

MAX_LISTED = 20


def read_lora(path: str | os.PathLike, family: str | None = None, allow_unmatched: bool = False, *,
              fix_split_qkv_alpha: bool = False) -> LoraFile:
    """Load a LoRA file of any supported format; every module becomes a `Module` on a canonical `Target`.

    Keys that map to no target are an error listing them, unless `allow_unmatched` (then they are
    recorded in `LoraFile.unmatched`). `fix_split_qkv_alpha`: see `split_qkv_alpha`.
    """
    tensors, metadata = load_tensors(path)
    # NaN/inf in a LoRA would spread into every merge and checkpoint made from it: name them once, here.
    nonfinite = NonFiniteTracker(os.fspath(path))
    for key, tensor in tensors.items():
        nonfinite.check(key, tensor)
    nonfinite.warn()
    return lora_from_tensors(tensors, metadata, family, allow_unmatched, path=os.fspath(path),
                             fix_split_qkv_alpha=fix_split_qkv_alpha)


def unmatched_message(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return f"{len(keys)} key(s) map to no target: {shown}{more}; pass --allow_unmatched to drop them"


def lora_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      family: str | None = None, allow_unmatched: bool = False, path: str = "", *,
                      fix_split_qkv_alpha: bool = False) -> LoraFile:
    metadata = dict(metadata or {})
    cloneofsimo_file = cloneofsimo.is_cloneofsimo(tensors)
    if cloneofsimo_file:  # lora_diffusion's `<model>:<i>:up` files: no names, rebuilt from the layer order
        tensors = cloneofsimo.as_kohya(tensors, metadata, path or None)
    fm = detect({k: tuple(v.shape) for k, v in tensors.items()}, metadata, family, path or None)
    if fm.unmatched and not allow_unmatched:
        raise LoraToolsError(unmatched_message(fm.unmatched) + f" (detected family {fm.family.name})", file=path or None)
    if not fm.matches:
        raise LoraToolsError(f"no module of this file fits the {fm.family.name} family", file=path or None)
    fmt = "cloneofsimo" if cloneofsimo_file else format_of(fm, list(tensors))
    modules = _modules(fm, tensors, PeftAlphas(metadata, path or None), path)
    notes = split_qkv_alpha(modules, fm.family, metadata, fix_split_qkv_alpha)
    return LoraFile(path, fm.family.name, fmt, modules, metadata, list(fm.unmatched), notes,
                    variant_of(fm.family.name, metadata))


def _trained_with_split_qkv(metadata: Mapping[str, str]) -> bool:
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return False
    return isinstance(args, dict) and str(args.get("split_qkv", "")).lower() == "true"


def split_qkv_alpha(modules: list[Module], family: Family, metadata: Mapping[str, str], fix: bool) -> list[str]:
    """sd-scripts' `split_qkv=True` saves fused q/k/v (and linear1) LoRAs at rank n·r but keeps alpha,
    so every loader applies α/(n·r) instead of α/r (sd-scripts#2204, formats.md §3.3). Only the metadata
    reveals it. By default we reproduce what loaders do and say so; with `fix`, alpha is multiplied by n
    on the fused modules whose up factor is block diagonal (the layout split_qkv writes).
    """
    if not _trained_with_split_qkv(metadata):
        return []
    fused = []
    for module in modules:
        if module.target.rows is not None or "lora_up.weight" not in module.tensors:
            continue
        parts = _parts(family, module.target)
        if len(parts) > 1 and _block_diagonal(module.tensors["lora_up.weight"], parts):
            fused.append((module, len(parts)))
    if not fused:
        return []
    if fix:
        for module, n in fused:
            alpha = module.tensors.get("alpha")
            rank = float(module.tensors["lora_down.weight"].shape[0])
            value = float(alpha) if alpha is not None and float(alpha) != 0 else rank
            module.tensors = dict(module.tensors, alpha=torch.tensor(value * n, dtype=torch.float32))
        return [f"split_qkv=True: multiplied alpha of {len(fused)} fused qkv/linear1 modules by their part count "
                "(sd-scripts#2204)"]
    return [f"split_qkv=True: {len(fused)} fused qkv/linear1 modules carry an alpha that loaders apply 3-4x too "
            "weakly (sd-scripts#2204); kept as is, pass --fix_split_qkv_alpha to correct it"]


def _parts(family: Family, target: Target) -> list[tuple[int, int]]:
    for naming in family.namings.get(target.component, ()):
        slots = family.table.by_key[naming].get(target.key, [])
        if len(slots) > 1:
            return [s.rows for _, s in slots]
    return []


def _block_diagonal(up: torch.Tensor, parts: list[tuple[int, int]]) -> bool:
    rank = up.shape[1]
    if rank % len(parts):
        return False
    width = rank // len(parts)
    for i, (s, e) in enumerate(parts):
        block = up[s:e].clone()
        block[:, i * width:(i + 1) * width] = 0
        if block.any():
            return False
    return True


def _modules(fm: FileMatch, tensors: Mapping[str, torch.Tensor], alphas: PeftAlphas, path: str) -> list[Module]:
    table = fm.family.table
    modules: list[Module] = []
    taken: dict[str, list[tuple[tuple[int, int], str]]] = {}
    for name, m in fm.matches.items():
        keys = fm.modules[name]
        full = table.shapes[m.slot.key]
        rows = m.slot.rows
        shape = (rows[1] - rows[0], *full[1:]) if rows else full
        span = rows or (0, full[0])
        for other_span, other in taken.get(m.slot.key, []):
            if span[0] < other_span[1] and other_span[0] < span[1]:
                raise LoraToolsError(f"modules {other} and {name} both change {m.slot.key}", file=path or None)
        taken.setdefault(m.slot.key, []).append((span, name))
        t = {suffix: tensors[key] for suffix, key in keys.items()}
        check_module(t, name, file=path or None, keys=keys)
        if "alpha" in t:
            t["alpha"] = t["alpha"].reshape(())
        elif alphas and "lora_down.weight" in t:
            alpha = alphas.alpha_for(m.prefix, m.path)
            if alpha is not None:
                # in the weights' dtype, as kohya files store it, when that dtype holds the value exactly
                dtype = t["lora_down.weight"].dtype
                exact = dtype.is_floating_point and float(torch.tensor(alpha, dtype=dtype)) == alpha
                t["alpha"] = torch.tensor(alpha, dtype=dtype if exact else torch.float32)
        if "row_offset" in t:
            t = _row_window(t, shape, name, path)
        axis = None
        if "dora_scale" in t:
            t["dora_scale"], axis = _dora(t["dora_scale"], keys["dora_scale"], shape, name)
        if m.slot.swap:
            t = swap_halves(t, shape, name)
        modules.append(Module(Target(m.slot.key, rows, m.component, tuple(shape)), t, name, axis))
    return modules


def _row_window(t: dict[str, torch.Tensor], shape: tuple[int, ...], name: str, path: str) -> dict[str, torch.Tensor]:
    """ComfyUI's `.row_offset` of a LoKr as the window [offset, rows] of its product's rows that this target takes
    (networks.lokr), refused when it falls outside the product: it is never dropped. A product of the target's
    own size ignores the offset, as ComfyUI does (it narrows only a product larger than the weight)."""
    t = dict(t)
    offset = int(t.pop("row_offset").reshape(()).item())
    product_rows = io_dims({k: tuple(v.shape) for k, v in t.items()})[0]
    if product_rows is None or (product_rows != shape[0] and offset + shape[0] > product_rows):
        raise LoraToolsError(f"row_offset {offset} with {shape[0]} target rows falls outside the LoKr's "
                             f"{product_rows} rows", file=path or None, key=f"{name}.row_offset")
    t[WINDOW_SUFFIX] = torch.tensor([offset, shape[0]], dtype=torch.int64)
    return t


def _dora(scale: torch.Tensor, key: str, shape: tuple[int, ...], name: str) -> tuple[torch.Tensor, str]:
    """DoRA magnitude as [out, 1(, 1, 1)] (axis "out") or [1, in(, 1, 1)] (axis "in")."""
    extra = [1] * (len(shape) - 2)
    if "magnitude" in key.rsplit(".", 2)[-1] or "lora_magnitude_vector" in key or scale.dim() == 1:
        # PEFT / AI-Toolkit magnitudes are always per output row, whatever their stored shape.
        return scale.reshape(-1, 1, *extra), "out"
    axis = DoraMagnitude.from_dora_scale(scale, name).axis
    return scale, axis
