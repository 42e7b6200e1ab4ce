"""Base checkpoints: which family a checkpoint is, and where each canonical target lives in it.

A checkpoint may use the canonical layout (LDM single-file SD, BFL Flux), the same with a key prefix
(`model.diffusion_model.` in ComfyUI-saved Flux files), or a diffusers layout (`down_blocks…` UNets,
`transformer_blocks…` Flux transformers) in which one canonical fused weight is several tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.errors import AmbiguousFamilyError, LoraToolsError
from library.formats.family import Family
from library.formats.registry import FAMILIES
from library.formats.types import Target

MAIN_COMPONENTS = ("unet", "transformer")


@dataclass(frozen=True)
class Placement:
    """Rows `target_rows` of a target's weight are rows `checkpoint_rows` of `checkpoint_key`.

    None means all rows. `swap` means the two halves are in the other order in the checkpoint
    (Flux final-layer modulation in diffusers layout).
    """

    checkpoint_key: str
    checkpoint_rows: tuple[int, int] | None
    target_rows: tuple[int, int] | None
    swap: bool = False


class CheckpointLayout:
    """Maps canonical targets of `family` onto a checkpoint's keys: `prefix` + (canonical key, or the
    `naming` module path + `.weight` when the checkpoint uses another naming)."""

    def __init__(self, family: str, prefix: str = "", naming: str | None = None, strip: str = ""):
        self.family: Family = FAMILIES[family]
        self.prefix = prefix
        self.naming = naming
        self.strip = strip  # canonical prefix absent from the checkpoint (UNet-only LDM files)

    @property
    def name(self) -> str:
        return f"{self.family.name}:{self.naming or 'canonical'}{':' + self.prefix if self.prefix else ''}"

    def _own(self, key: str) -> str:
        return self.prefix + (key[len(self.strip):] if self.strip and key.startswith(self.strip) else key)

    def placements(self, target: Target) -> list[Placement]:
        """Where the rows of `target` live in the checkpoint."""
        table = self.family.table
        if self.naming is None or target.component not in MAIN_COMPONENTS:
            return [Placement(self._own(target.key), target.rows, None)]
        span = target.rows or (0, table.shapes[target.key][0])
        out = []
        for path, slot in table.by_key[self.naming].get(target.key, []):
            s, e = slot.rows or (0, table.shapes[target.key][0])
            a, b = max(s, span[0]), min(e, span[1])
            if a >= b:
                continue
            size = e - s
            if slot.swap and (a, b) != (s, e):
                raise LoraToolsError("a row slice of a half-swapped weight is not supported", key=target.key)
            ck_rows = None if (a, b) == (s, e) else (a - s, b - s)
            t_rows = None if (a, b) == span else (a - span[0], b - span[0])
            out.append(Placement(self.prefix + path + ".weight", ck_rows if size else None, t_rows, slot.swap))
        return out

    def targets(self, keys) -> dict[str, tuple[Target, bool]]:
        """checkpoint key -> (its canonical target, halves swapped) for every key of `keys` with one."""
        table = self.family.table
        out: dict[str, tuple[Target, bool]] = {}
        wanted = set(keys)
        if self.naming is not None:
            for path, slot in table.slots[self.naming].items():
                ck = self.prefix + path + ".weight"
                if ck in wanted:
                    full = table.shapes[slot.key]
                    shape = (slot.rows[1] - slot.rows[0], *full[1:]) if slot.rows else full
                    out[ck] = (Target(slot.key, slot.rows, table.components[slot.key], tuple(shape)), slot.swap)
        for key, shape in table.shapes.items():
            if self.naming is not None and table.components[key] in MAIN_COMPONENTS:
                continue
            ck = self._own(key)
            if ck in wanted:
                out[ck] = (Target(key, None, table.components[key], tuple(shape)), False)
        return out

def layout_candidates(family: str | None = None) -> list[CheckpointLayout]:
    """Every layout a checkpoint of `family` (or of any family) may have: canonical, prefixed or stripped, diffusers."""
    out = []
    for name, fam in FAMILIES.items():
        if family is not None and name != family:
            continue
        out.append(CheckpointLayout(name))
        main_prefix = "model.diffusion_model."
        if any(k.startswith(main_prefix) for k in fam.table.shapes):
            out.append(CheckpointLayout(name, strip=main_prefix))  # UNet-only file with bare LDM keys
        else:
            out.append(CheckpointLayout(name, prefix=main_prefix))  # ComfyUI-saved transformer checkpoints
        out.extend(CheckpointLayout(name, prefix=p, naming=n) for p, n in fam.checkpoint_layouts.values())
    return out


def _main_fit(layout: CheckpointLayout, keys: set[str], reader) -> tuple[int, int, int]:
    """Over the placements of the family's main (UNet/transformer) weights: (present with their exact
    shapes, present by name, all)."""
    table = layout.family.table
    exact = present = total = 0
    for key, component in table.components.items():
        if component not in MAIN_COMPONENTS:
            continue
        for p in layout.placements(Target(key, None, component, table.shapes[key])):
            total += 1
            if p.checkpoint_key not in keys:
                continue
            present += 1
            want = table.shapes[key]
            if p.target_rows:
                want = (p.target_rows[1] - p.target_rows[0], *want[1:])
            shape = tuple(reader.shape(p.checkpoint_key))
            if shape == tuple(want) if p.checkpoint_rows is None else shape[1:] == tuple(want[1:]):
                exact += 1
    return exact, present, total


def score(layout: CheckpointLayout, reader) -> float:
    """Fraction of the family's UNet/transformer weights present in the checkpoint with their exact shapes."""
    exact, _present, total = _main_fit(layout, set(reader.keys()), reader)
    return exact / total if total else 0.0


def detect_checkpoint_layout(reader, family: str | None = None) -> CheckpointLayout | None:
    """The best-fitting family layout (over half of its main weights present with exact shapes), or None."""
    layouts = layout_candidates(family)
    scored = sorted(((score(c, reader), c) for c in layouts), key=lambda x: -x[0])
    if not scored or scored[0][0] <= 0.5:
        return None
    best = scored[0][0]
    tied = [c for s, c in scored if s == best and c.family.name != scored[0][1].family.name]
    if tied:
        names = ", ".join(sorted({scored[0][1].family.name, *(c.family.name for c in tied)}))
        raise AmbiguousFamilyError(f"ambiguous checkpoint family ({names}); say which with --family",
                                   file=getattr(reader, "path", None))
    return scored[0][1]


def partial_layout(reader, family: str, *, min_main_keys: int = 0) -> CheckpointLayout | None:
    """The layout of `family` that fits a checkpoint holding only part of the model (pruned, UNet- or
    text-encoder-only, distilled with fewer blocks, a small test model), where `detect_checkpoint_layout`'s
    exact-shape majority cannot hold.

    Candidates are `layout_candidates(family)`; the best has most main (UNet/transformer) weights with
    their exact shapes, then most of the family's weights (any component) present by name. None when no
    key of the checkpoint fits any candidate, or when the best has fewer than `min_main_keys` main
    weights present by name (a caller that needs the main model, not only its text encoders).
    """
    keys = set(reader.keys())
    best, best_rank, best_present = None, (0, 0), 0
    for layout in layout_candidates(family):
        exact, present, _total = _main_fit(layout, keys, reader)
        rank = (exact, len(layout.targets(keys)))
        if rank > best_rank:
            best, best_rank, best_present = layout, rank, present
    if best is None or best_rank[1] == 0 or best_present < min_main_keys:
        return None
    return best


# Old name (extract_family calls it): a partial checkpoint's layout, shapes counted first, then keys.
layout_by_keys = partial_layout


def detect_checkpoint_family(reader) -> str | None:
    """sd1 / sd2 / sdxl / flux1 … from a checkpoint's keys and shapes; None when no family fits."""
    layout = detect_checkpoint_layout(reader)
    return layout.family.name if layout else None
