"""Writing canonical modules in kohya, diffusers/PEFT, AI-Toolkit or ComfyUI naming.

Per canonical weight, the output naming's modules ("slots") receive the input modules as they are
when the row ranges agree, else after an exact split/fuse (regroup.py). The scale travels as alpha
where the format can hold it (`.alpha` keys, or `lora_adapter_metadata` for diffusers); AI-Toolkit's
PEFT files cannot, so there it is baked into the factors with power-of-two moves (exact when the scale
is a power of two, a rounding of the last bit otherwise). Which prefix, naming and alpha rule each
format uses for a family comes from `library.formats.specs` (one module per format). PEFT holds only
LoRA: LoHa/LoKr modules are written there as their exact LoRA form, or refused (`_as_lora`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from library.errors import LoraToolsError
from library.exact_lowrank import fits_as_factors
from library.formats.family import Slot, WriteSpec
from library.formats.peft_alpha import KEY as PEFT_METADATA_KEY
from library.formats.peft_alpha import adapter_metadata
from library.formats.registry import FAMILIES
from library.formats.regroup import fuse, kind_of, rank_of, scale_of, split, swap_halves
from library.formats.types import Module
from networks import WINDOW_SUFFIX, adapter_from_tensors

FAMILY_KEY = "loratools.family"


def lora_tensors(modules: Iterable[Module], family: str, fmt: str, notes: list[str] | None = None) \
        -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `modules` in format `fmt`, and the metadata that format adds.

    `notes`, when given, receives one line per output module that was split from or fused out of
    input modules.
    """
    fam = FAMILIES.get(family)
    if fam is None:
        raise LoraToolsError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    specs = fam.write.get(fmt)
    if specs is None:
        raise LoraToolsError(f"cannot write {fmt!r} for {family}; formats: {', '.join(fam.write)}")
    table = fam.table
    grouped: dict[tuple[str, str], list[Module]] = {}
    for module in modules:
        grouped.setdefault((module.target.component, module.target.key), []).append(module)
    out: dict[str, torch.Tensor] = {}
    peft: dict[str, dict[str, tuple[int, float]]] = {}
    for (component, key), mods in grouped.items():
        spec = specs.get(component)
        if spec is None:
            raise LoraToolsError(f"the {fmt} format of {family} has no place for the {component} component", key=key)
        slots = table.by_key[spec.naming].get(key)
        if not slots:
            raise LoraToolsError(f"{fmt} naming has no module for this weight", key=key)
        full = table.shapes[key]
        if spec.peft:
            mods = [_as_lora(m, fam, fmt, notes) for m in mods]
        placed = place(mods, slots, full, key)
        if notes is not None and (len(placed) != len(mods) or any(t is not m.tensors for (_, _, t), m in zip(placed, mods))):
            notes.append(f"{', '.join(m.source for m in mods)} -> {', '.join(_name(spec, p) for p, _, _ in placed)}"
                         f" ({_describe(placed)})")
        for path, slot, tensors in placed:
            shape = _slot_shape(slot, full)
            if slot.swap:
                tensors = swap_halves(tensors, shape, path)
            name = _name(spec, path)
            _emit(out, name, path, tensors, spec, peft)
    # Our own record of the family: some module sets fit two families (Flux.1 and Qwen-Image share
    # diffusers attention names and widths), and detection never guesses.
    extra: dict[str, str] = {FAMILY_KEY: family}
    if peft:
        extra[PEFT_METADATA_KEY] = adapter_metadata(peft)
        extra["format"] = "pt"
    return out, extra


# Tensors of a module that are neither factors nor alpha: they travel unchanged to the LoRA form.
_CARRIED = ("dora_scale", "diff_b", "lora_up.bias")


def _as_lora(module: Module, fam, fmt: str, notes: list[str] | None) -> Module:
    """A LoHa/LoKr module as an exact LoRA, for PEFT formats, which have no other adapter types.

    LoHa (A1 B1) ⊙ (A2 B2) and LoKr kron(W1, W2) are exact LoRAs of rank r1·r2 (networks' `exact_factors`).
    Where that rank makes the factors larger than the weight itself the module is refused instead of
    being written under names no PEFT loader reads.
    """
    kind = kind_of(module.tensors)
    if kind not in ("loha", "lokr"):
        return module
    adapter = adapter_from_tensors(module.tensors, module.source)
    shape = module.target.shape
    rows, cols = shape[0], math.prod(shape[1:])
    rank = adapter.exact_rank
    label = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    if not fits_as_factors(rank, shape):
        holders = [f for f, specs in fam.write.items() if module.target.component in specs
                   and not specs[module.target.component].peft]
        raise LoraToolsError(f"{fmt} (PEFT) has no {label}, and this module's exact LoRA form would need rank {rank} "
                             f"on a {rows}x{cols} weight (larger than the weight); formats that hold {label} modules: "
                             f"{', '.join(holders)}", key=module.source)
    up, down = adapter.exact_factors()
    dtype = _product_dtype(t for s, t in module.tensors.items() if s.startswith(("hada_", "lokr_")))
    tensors = {"lora_down.weight": down.reshape(rank, *shape[1:]).to(dtype),
               "lora_up.weight": up.reshape(rows, rank, *[1] * (len(shape) - 2)).to(dtype),
               "alpha": torch.tensor(adapter.scale * rank, dtype=torch.float32)}
    tensors.update({s: module.tensors[s] for s in _CARRIED if s in module.tensors})
    if notes is not None:
        notes.append(f"{module.source}: {label} rank {adapter.rank} -> exact LoRA rank {rank} ({fmt} has no {label})")
    return Module(module.target, tensors, module.source, module.dora_axis)


def _name(spec: WriteSpec, path: str) -> str:
    return spec.prefix + (path.replace(".", "_") if spec.flat else path)


def _describe(placed) -> str:
    ranks = [rank_of(t) for _, _, t in placed]
    kinds = {kind_of(t) for _, _, t in placed}
    return f"{'/'.join(sorted(kinds))} rank {', '.join(str(r) for r in ranks)}"


def _slot_shape(slot: Slot, full: tuple[int, ...]) -> tuple[int, ...]:
    return (slot.rows[1] - slot.rows[0], *full[1:]) if slot.rows else tuple(full)


def place(mods: list[Module], slots: list[tuple[str, Slot]], full: tuple[int, ...], key: str) \
        -> list[tuple[str, Slot, dict[str, torch.Tensor]]]:
    """Distribute the modules of one weight over the output slots (split and fuse where ranges differ)."""
    ranges = [(path, slot, slot.rows or (0, full[0])) for path, slot in slots]
    by_range = {r: (p, s) for p, s, r in ranges}
    spans = [m.target.rows or (0, full[0]) for m in mods]
    if all(s in by_range for s in spans):
        return [(*by_range[s], m.tensors) for s, m in zip(spans, mods, strict=True)]
    bounds = sorted({0, full[0], *(x for s in spans for x in s), *(x for _, _, r in ranges for x in r)})
    pieces: list[tuple[tuple[int, int], dict[str, torch.Tensor]]] = []
    for (a, b), m in zip(spans, mods, strict=True):
        cuts = [x for x in bounds if a <= x <= b]
        parts = list(zip(cuts[:-1], cuts[1:], strict=True))
        if len(parts) == 1:
            pieces.append(((a, b), m.tensors))
            continue
        split_parts = split(m.tensors, [(x - a, y - a) for x, y in parts], (b - a, *full[1:]), m.source)
        pieces.extend(((x, y), t) for (x, y), t in zip(parts, split_parts, strict=True) if t is not None)
    result = []
    used = 0
    for path, slot, (s, e) in ranges:
        inside = [((x - s, y - s), t) for (x, y), t in pieces if s <= x and y <= e]
        if not inside:
            continue
        used += len(inside)
        if len(inside) == 1 and inside[0][0] == (0, e - s):
            result.append((path, slot, inside[0][1]))
        else:
            result.append((path, slot, fuse(inside, e - s, (e - s, *full[1:]), path)))
    if used != len(pieces):
        raise LoraToolsError("adapter rows do not fit the output naming's modules", key=key)
    return result


def bake_factors(scale: float) -> tuple[float, float]:
    """(down, up) multipliers with product `scale`, moving powers of two to up for small scales.

    Same split as sd-scripts/diffusers: start with everything on down, and while down·2 < up, double
    down and halve up. Power-of-two moves keep the product exact in any float format.
    """
    down, up = scale, 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def _alpha_value(tensors: Mapping[str, torch.Tensor]) -> float:
    alpha = tensors.get("alpha")
    rank = rank_of(tensors)
    value = float(alpha.float()) if alpha is not None else None
    return float(rank) if value is None or value == 0 else value


def _product_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """A dtype that holds products of the factors without rounding: float32 for 16-bit ones, else float64."""
    return torch.float32 if max(t.element_size() for t in tensors) <= 2 else torch.float64


def _fold_tucker(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tucker LoCon as plain LoCon: down' [r, in, k, k] = mid ∘ down, kept in a dtype wider than the factors'
    (casting it back to bf16 would round every weight of the module)."""
    out = dict(tensors)
    mid, down = out.pop("lora_mid.weight"), tensors["lora_down.weight"]
    dtype = _product_dtype((mid, down))
    out["lora_down.weight"] = torch.einsum("mnhw,ni->mihw", mid.to(dtype), down.to(dtype).reshape(down.shape[0], -1))
    return out


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t·factor in at least float32 (float64 stays float64), back in t's dtype."""
    return (t.to(torch.promote_types(t.dtype, torch.float32)) * factor).to(t.dtype)


def _emit(out: dict, name: str, path: str, tensors: dict[str, torch.Tensor], spec: WriteSpec,
          peft: dict[str, dict[str, tuple[int, float]]]) -> None:
    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise LoraToolsError("two modules would be written under the same key", key=key)
        out[key] = value

    kind = kind_of(tensors)
    if kind == "lora" and spec.peft:
        if "lora_mid.weight" in tensors:
            tensors = _fold_tucker(tensors)
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if spec.alpha == "bake":
            d, u = bake_factors(scale_of(tensors))
            down = down if d == 1 else _scaled(down, d)
            up = up if u == 1 else _scaled(up, u)
        put(f"{name}.lora_A.weight", down)
        put(f"{name}.lora_B.weight", up)
        if "lora_up.bias" in tensors:
            bias = tensors["lora_up.bias"]
            if spec.alpha == "bake" and scale_of(tensors) != 1:
                bias = _scaled(bias, scale_of(tensors))
            put(f"{name}.lora_B.bias", bias)
        if "diff_b" in tensors:
            put(f"{name}.diff_b", tensors["diff_b"])
        if "dora_scale" in tensors:
            scale = tensors["dora_scale"]
            if scale.shape[0] != up.shape[0]:
                raise LoraToolsError("PEFT DoRA holds only per-output-row magnitudes; this module's are per input "
                                     "column (write kohya or comfy instead)", key=name)
            put(f"{name}.lora_magnitude_vector", scale.reshape(-1))
        if spec.alpha == "metadata":
            peft.setdefault(spec.adapter_name, {})[path] = (rank_of(tensors), _alpha_value(tensors))
        elif spec.alpha == "tensor":
            put(f"{name}.alpha", _alpha_tensor_out(tensors))
        return
    for suffix, value in tensors.items():
        if suffix == "alpha":
            continue
        if suffix == WINDOW_SUFFIX:  # back to ComfyUI's key: the offset alone, the rows being the target's
            put(f"{name}.row_offset", torch.tensor(int(value[0]), dtype=torch.int64))
            continue
        if suffix == "lora_up.bias":
            # kohya/ComfyUI have no LoRA bias; ComfyUI's own conversion makes it a bias delta (diff_b).
            scale = scale_of(tensors)
            put(f"{name}.diff_b", value if scale == 1 else _scaled(value, scale))
            continue
        put(f"{name}.{suffix}", value)
    # A LoKr with both factors full has no rank and ignores alpha: nothing to write when none was stored.
    if kind != "full" and ("alpha" in tensors or rank_of(tensors) is not None):
        put(f"{name}.alpha", _alpha_tensor_out(tensors))


def _alpha_tensor_out(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The stored alpha unchanged, or rank when absent (sd-scripts writes alpha = dim)."""
    alpha = tensors.get("alpha")
    if alpha is not None:
        return alpha
    return torch.tensor(float(rank_of(tensors)), dtype=torch.float32)
