"""Flux.1 glue for flux_merge_lora.py: read Flux LoRAs of any trainer, find where their canonical targets
live in a Flux checkpoint (BFL single file, the same under ComfyUI's `model.diffusion_model.`, the diffusers
`transformer` layout in one file or shards, standalone CLIP-L / T5-XXL files), and stream the merge.

Everything meets on canonical BFL targets (library.formats): a diffusers `to_k` LoRA is a row slice of
`qkv`, and the checkpoint layout says which rows of which checkpoint tensor that slice is (with the
final-layer scale/shift halves swapped in diffusers checkpoints). Per canonical weight we build the summed
delta Σ ratioᵢ·ΔWᵢ once, in float32 on the working device, and add it to each checkpoint tensor it covers
in row chunks (library.weight_update.add_delta: wide compute, clamped cast back, realized-vs-intended
error), so memory holds one weight, its delta and a chunk, never the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.formats import FAMILIES, CheckpointLayout, LoraFile, Module, Target, read_lora
from library.formats.checkpoint import MAIN_COMPONENTS, Placement, detect_checkpoint_layout
from library.safetensors_io import StreamingWriter, cast_clamped
from library.weight_update import add_delta
from networks import adapter_from_tensors

FAMILY = "flux1"
# component -> (flag name, canonical key prefix of that text encoder)
TEXT_ENCODERS = {"te1": ("clip_l", "text_encoders.clip_l.transformer."),
                 "t5": ("t5xxl", "text_encoders.t5xxl.transformer.")}
# Words in a LoRA's metadata that name a model whose module names collide with Flux.1's.
OTHER_MODELS = {"flux.2": "Flux.2", "flux-2": "Flux.2", "flux2": "Flux.2", "hunyuan": "HunyuanVideo",
                "chroma": "Chroma", "sd3": "SD3", "auraflow": "AuraFlow", "wan2": "Wan", "wan-2": "Wan", "ltx": "LTX-Video"}
ROW_CHUNK_ELEMENTS = 1 << 23  # ≈32 MiB of float32 per chunk of an update


# ---------------------------------------------------------------------------------------------------------
# LoRAs


def _other_model(metadata: dict[str, str]) -> str | None:
    text = " ".join(str(metadata.get(k, "")) for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    return next((model for word, model in OTHER_MODELS.items() if word in text), None)


def read_flux_lora(path: str, allow_unmatched: bool = False) -> LoraFile:
    """A Flux.1 LoRA of any supported format; anything else is a clear error naming what it looks like."""
    try:
        lora = read_lora(path, allow_unmatched=allow_unmatched)
    except LoraToolsError as exc:
        from library.safetensors_io import LazyReader

        with LazyReader(path) as reader:
            other = _other_model(reader.metadata)
        hint = f" (its metadata says {other})" if other else ""
        raise LoraToolsError(f"not a FLUX.1 LoRA{hint}: {exc.message}",
                             file=path) from None
    if lora.family != FAMILY:
        raise LoraToolsError(f"this is a {FAMILIES[lora.family].description} LoRA, not FLUX.1; "
                             f"use merge_lora.py / svd_merge_lora.py for it", file=path)
    other = _other_model(lora.metadata)
    if other:
        raise LoraToolsError(f"the module names fit FLUX.1 but the metadata says {other}, whose layers share "
                             f"Flux's names and shapes; refusing to guess", file=path)
    return lora


@dataclass
class Weighted:
    """A module of input file `index` at strength `ratio`."""

    index: int
    module: Module
    ratio: float


def weighted_modules(loras: Sequence[LoraFile], ratios: Sequence[float]) -> list[Weighted]:
    return [Weighted(i, m, float(r)) for i, (lora, r) in enumerate(zip(loras, ratios, strict=True)) for m in lora.modules]


def by_key(items: Iterable[Weighted]) -> dict[str, list[Weighted]]:
    out: dict[str, list[Weighted]] = {}
    for w in items:
        out.setdefault(w.module.target.key, []).append(w)
    return out


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts


def _flux_layouts() -> list[CheckpointLayout]:
    fam = FAMILIES[FAMILY]
    out = [CheckpointLayout(FAMILY), CheckpointLayout(FAMILY, prefix="model.diffusion_model.")]
    out += [CheckpointLayout(FAMILY, prefix=p, naming=n) for p, n in fam.checkpoint_layouts.values()]
    return out


def _main_placements(layout: CheckpointLayout) -> list[Placement]:
    table = layout.family.table
    return [p for key, c in table.components.items() if c in MAIN_COMPONENTS
            for p in layout.placements(Target(key, None, c, table.shapes[key]))]


def flux_layout(reader) -> CheckpointLayout:
    """The layout of a Flux transformer checkpoint.

    Full checkpoints are recognised by names and shapes (formats' detector); checkpoints with fewer
    blocks (pruned or distilled models, small test files) by names alone, the shapes of the weights we
    change being checked one by one when they are used.
    """
    found = detect_checkpoint_layout(reader, FAMILY)
    if found is not None:
        return found
    keys = set(reader.keys())
    best, best_hits = None, 0
    for layout in _flux_layouts():
        hits = sum(p.checkpoint_key in keys for p in _main_placements(layout))
        if hits > best_hits:
            best, best_hits = layout, hits
    if best is None or best_hits < 4:
        raise LoraToolsError("not a FLUX.1 transformer checkpoint (no BFL or diffusers Flux weight names found)",
                             file=getattr(reader, "path", None))
    return best


def text_encoder_layout(reader, component: str) -> CheckpointLayout:
    """A standalone CLIP-L / T5-XXL file (HF names), or one that keeps ComfyUI's `text_encoders.…` prefix."""
    flag, prefix = TEXT_ENCODERS[component]
    table = FAMILIES[FAMILY].table
    own = [k for k, c in table.components.items() if c == component]
    keys = set(reader.keys())
    for layout in (CheckpointLayout(FAMILY, strip=prefix), CheckpointLayout(FAMILY)):
        if sum(layout.placements(Target(k, None, component, table.shapes[k]))[0].checkpoint_key in keys
               for k in own) >= min(4, len(own)):
            return layout
    raise LoraToolsError(f"not a {flag} text-encoder checkpoint (none of its weight names found)",
                         file=getattr(reader, "path", None))


# ---------------------------------------------------------------------------------------------------------
# Applying modules into a checkpoint


@dataclass
class ApplyStats:
    """What the merge did: per changed tensor the intended and realized change, and the clamp count."""

    changed: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # key -> (‖Δ‖², ‖err‖², clamped)
    copied: int = 0
    skipped: list[str] = field(default_factory=list)  # canonical keys the checkpoint lacks (allow_unmatched)

    def add(self, key: str, intended_sq: float, error_sq: float, clamped: int) -> None:
        a, b, c = self.changed.get(key, (0.0, 0.0, 0))
        self.changed[key] = (a + intended_sq, b + error_sq, c + clamped)

    @property
    def relative_error(self) -> float:
        intended = sum(v[0] for v in self.changed.values())
        return math.sqrt(sum(v[1] for v in self.changed.values()) / intended) if intended > 0 else 0.0

    @property
    def clamped(self) -> int:
        return sum(v[2] for v in self.changed.values())

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        rel = [(k, math.sqrt(e / i) if i > 0 else 0.0) for k, (i, e, _c) in self.changed.items()]
        return sorted(rel, key=lambda x: -x[1])[:n]


@dataclass
class _Job:
    """One canonical weight (or its bias) and where its rows are in the checkpoint."""

    key: str
    items: list[Weighted]
    placements: list[Placement]
    bias: bool = False


def plan(reader, layout: CheckpointLayout, items: Sequence[Weighted], allow_unmatched: bool = False,
         stats: ApplyStats | None = None) -> dict[str, tuple[_Job, Placement]]:
    """checkpoint key -> (its canonical job, its placement), checking presence and shapes first."""
    table = layout.family.table
    keys = set(reader.keys())
    out: dict[str, tuple[_Job, Placement]] = {}
    missing = []
    for key, group in by_key(items).items():
        full = table.shapes[key]
        comp = table.components[key]
        places = layout.placements(Target(key, None, comp, full))
        if not places or any(p.checkpoint_key not in keys for p in places):
            missing.append(key)
            continue
        covered = 0
        for p in places:
            rows = p.target_rows or (0, full[0])
            shape = tuple(reader.shape(p.checkpoint_key))
            want_cols = tuple(full[1:])
            ck_rows = p.checkpoint_rows or (0, shape[0])
            if shape[1:] != want_cols or ck_rows[1] - ck_rows[0] != rows[1] - rows[0] or ck_rows[1] > shape[0]:
                raise LoraToolsError(f"checkpoint weight has shape {list(shape)} where FLUX.1's {key} "
                                     f"{list(full)} (rows {rows}) should be", file=reader.path, key=p.checkpoint_key)
            covered += rows[1] - rows[0]
        if covered != full[0]:
            raise LoraToolsError(f"the checkpoint holds {covered} of the {full[0]} rows of this weight",
                                 file=reader.path, key=key)
        job = _Job(key, group, places)
        for p in places:
            out[p.checkpoint_key] = (job, p)
        if any(_bias_of(w) is not None for w in group):
            bias_places = [Placement(_bias_key(p.checkpoint_key), p.checkpoint_rows, p.target_rows, p.swap) for p in places]
            if any(p.checkpoint_key not in keys for p in bias_places):
                raise LoraToolsError("a module changes the bias of this weight but the checkpoint has no bias",
                                     file=reader.path, key=key)
            bjob = _Job(key, group, bias_places, bias=True)
            for p in bias_places:
                out[p.checkpoint_key] = (bjob, p)
    if missing:
        if not allow_unmatched:
            shown = ", ".join(missing[:10]) + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
            raise LoraToolsError(f"{len(missing)} LoRA target(s) are not in this checkpoint: {shown}; "
                                 f"pass --allow_unmatched to skip them", file=reader.path)
        if stats is not None:
            stats.skipped.extend(missing)
    return out


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len(".weight")] + ".bias" if weight_key.endswith(".weight") else weight_key + ".bias"


def _bias_of(w: Weighted) -> torch.Tensor | None:
    """The module's bias change, scale applied (PEFT's `lora_B.bias` is scaled like the factors; `diff_b` is not)."""
    t = w.module.tensors
    if "lora_up.bias" in t:
        return t["lora_up.bias"].float() * adapter_from_tensors(t, w.module.source).scale
    for k in ("diff_b", "b_norm"):
        if k in t:
            return t[k].float()
    return None


def _swap(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def canonical_delta(job: _Job, full: tuple[int, ...], base: Callable[[], torch.Tensor] | None,
                    device: torch.device) -> torch.Tensor:
    """Σ ratioᵢ·ΔWᵢ over the whole canonical weight (or its bias), float32 on `device`.

    Low-rank modules give `up @ down` on the device; DoRA modules need the base weight (their change
    is W_dora − W at strength 1, scaled by the ratio: the ComfyUI/A1111 rule).
    """
    shape = (full[0],) if job.bias else tuple(full)
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for w in job.items:
        r0, r1 = w.module.target.full_rows
        if job.bias:
            b = _bias_of(w)
            if b is not None:
                total[r0:r1] += w.ratio * b.to(device)
            continue
        a = adapter_from_tensors(w.module.tensors, w.module.source, dora_axis=w.module.dora_axis)
        tshape = tuple(w.module.target.shape)
        if a.dora is not None:
            if base is None:
                raise LoraToolsError("DoRA module needs the base weight", key=job.key)
            total[r0:r1] += a.delta_with_base(base()[r0:r1].to(device), w.ratio).reshape(r1 - r0, *shape[1:])
        elif a.is_low_rank and a.kind == "lora":
            up, down = a.factors()
            total[r0:r1] += w.ratio * (up.to(device) @ down.to(device)).reshape(r1 - r0, *shape[1:])
        else:
            total[r0:r1] += w.ratio * a.delta(tshape).to(device).reshape(r1 - r0, *shape[1:])
    return total


def _canonical_base(reader, job: _Job, full: tuple[int, ...]) -> torch.Tensor:
    """The canonical weight assembled from its checkpoint pieces (halves put back in canonical order)."""
    out = torch.empty(tuple(full), dtype=torch.float32)
    for p in job.placements:
        t = reader.get(p.checkpoint_key).float()
        if p.checkpoint_rows:
            t = t[p.checkpoint_rows[0]:p.checkpoint_rows[1]]
        if p.swap:
            t = _swap(t)
        r0, r1 = p.target_rows or (0, full[0])
        out[r0:r1] = t.reshape(r1 - r0, *full[1:])
    return out


def touched_rows(job: _Job, p: Placement, full_rows: int) -> list[tuple[int, int]]:
    """Row ranges of the checkpoint tensor of placement `p` that some module changes (merged, sorted).

    Rows no module covers are left as stored: bit-identical, and no time spent adding zeros (a diffusers
    `to_k` LoRA touches 3072 of linear1's 21504 rows)."""
    t0, t1 = p.target_rows or (0, full_rows)
    c0 = p.checkpoint_rows[0] if p.checkpoint_rows else 0
    if p.swap:
        return [(c0, c0 + t1 - t0)]
    spans = sorted((max(a, t0), min(b, t1)) for a, b in (w.module.target.full_rows for w in job.items)
                   if min(b, t1) > max(a, t0))
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(c0 + a - t0, c0 + b - t0) for a, b in merged]


def update_tensor(weight: torch.Tensor, delta: torch.Tensor, rows: Sequence[tuple[int, int]], *,
                  compute_dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device,
                  on_stats: Callable[[float, float, int], None]) -> torch.Tensor:
    """`weight` with `delta` added to the given checkpoint row ranges, in row chunks, stored as `out_dtype`.

    `delta` covers the rows from the first range's start on (the placement's rows)."""
    out = weight.clone() if out_dtype == weight.dtype else cast_clamped(weight, out_dtype)
    origin = rows[0][0] if rows else 0
    per_row = max(1, math.prod(weight.shape[1:]))
    step = max(1, ROW_CHUNK_ELEMENTS // per_row)
    for r0, r1 in rows:
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            piece = weight[a:b].to(device)
            new, st = add_delta(piece, delta[a - origin:b - origin].reshape(piece.shape), compute_dtype=compute_dtype,
                                out_dtype=out_dtype)
            out[a:b] = new.to(out.device)
            on_stats(st.intended_norm ** 2, st.error_norm ** 2, st.clamped)
    return out


def apply_to_checkpoint(reader, layout: CheckpointLayout, items: Sequence[Weighted], save_to: str, *,
                        metadata: dict[str, str], save_dtype: torch.dtype | None = None,
                        compute_dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                        allow_unmatched: bool = False, inputs: Iterable[str] = (), overwrite: bool = False,
                        progress: Callable = lambda it, **_: it) -> ApplyStats:
    """Stream `reader` into `save_to` with every module of `items` added; untouched tensors copied byte for byte
    (or cast, when `save_dtype` asks for another float type)."""
    device = device or torch.device("cpu")
    stats = ApplyStats()
    jobs = plan(reader, layout, items, allow_unmatched, stats)
    table = layout.family.table

    def out_dtype(key: str) -> torch.dtype:
        dt = reader.dtype(key)
        return save_dtype if save_dtype is not None and dt.is_floating_point else dt

    specs = {k: (out_dtype(k), tuple(reader.shape(k))) for k in reader.keys()}
    remaining: dict[tuple[str, bool], int] = {}
    for job, _p in jobs.values():
        remaining[(job.key, job.bias)] = remaining.get((job.key, job.bias), 0) + 1
    cache: dict[tuple[str, bool], torch.Tensor] = {}
    with StreamingWriter(save_to, specs, metadata, inputs=inputs, overwrite=overwrite) as writer:
        for key in progress(reader.keys(), desc="merging", total=len(specs)):
            hit = jobs.get(key)
            if hit is None:
                if specs[key][0] == reader.dtype(key):
                    writer.write_raw(key, reader.get_raw(key))
                else:
                    writer.write(key, cast_clamped(reader.get(key), specs[key][0]))
                stats.copied += 1
                continue
            job, p = hit
            full = table.shapes[job.key]
            ident = (job.key, job.bias)
            if ident not in cache:
                needs_base = not job.bias and any("dora_scale" in w.module.tensors for w in job.items)
                base = (lambda j=job, f=full: _canonical_base(reader, j, f)) if needs_base else None
                cache[ident] = canonical_delta(job, full, base, device)
            delta = cache[ident]
            r0, r1 = p.target_rows or (0, full[0])
            piece = delta[r0:r1]
            if p.swap:
                piece = _swap(piece)
            rows = touched_rows(job, p, full[0])
            c0 = p.checkpoint_rows[0] if p.checkpoint_rows else 0
            piece = piece[rows[0][0] - c0:] if rows else piece
            weight = reader.get(key)
            new = update_tensor(weight, piece, rows, compute_dtype=compute_dtype, out_dtype=specs[key][0],
                                device=device, on_stats=lambda i, e, c, k=key: stats.add(k, i, e, c))
            writer.write(key, new.cpu())
            del weight, new, piece
            remaining[ident] -= 1
            if remaining[ident] == 0:
                del cache[ident]
    return stats
