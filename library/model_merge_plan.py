"""What merge_models.py does with every key, decided from the headers before any tensor is read.

A key is merged when every model has it with one shape (and the base too, where the method uses one) and
it is a float tensor with elements. Otherwise it is copied, listed with the reason:
  only in some inputs   from the first model that has it (sd-scripts' merge_models falls back the same way)
  marker                keys that carry meaning but no weights (`v_pred`, `ztsnr`, `edm_*`), or hold no
                        element: never merged or dropped, copied from the first model that has them
  not float             integer buffers (`position_ids`): from model A
  not in base           the base lacks the key: from model A
  --only, strength 0    outside the merged part, or a ratio of 0 from the block/key weights: from model A
  not in mask           --mask restricts the merge to its keys: the others keep model A's value
The per-key strength is, in order of precedence: the last --key_weights glob that matches (a glob matches
the end of a key: `attn*` is `*attn*`), --te_ratio for text-encoder keys, the key's --block_weights value
(1 outside every block), 1.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.model_blocks import KeyPlaces

MARKER_NAMES = ("v_pred", "ztsnr")
MARKER_PREFIXES = ("edm_",)


@dataclass(frozen=True)
class KeyPlan:
    key: str
    merge: bool
    source: int  # the model copied from (merge: model A, whose dtype the output keeps)
    dtype: torch.dtype  # of the output tensor
    shape: tuple[int, ...]
    strength: float = 1.0
    why: str = ""  # why it is copied


@dataclass
class MergePlan:
    keys: list[KeyPlan] = field(default_factory=list)

    @property
    def merged(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.merge]

    def copied(self, why: str) -> list[str]:
        return [k.key for k in self.keys if not k.merge and k.why == why]

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.keys:
            if not k.merge:
                out[k.why] = out.get(k.why, 0) + 1
        return out


def parse_key_weights(specs: Sequence[str] | None) -> list[tuple[str, float]]:
    out = []
    for spec in specs or ():
        pattern, sep, value = spec.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not pattern or number != number or number in (float("inf"), float("-inf")):
            raise LoraToolsError(f"--key_weights {spec!r}: expected GLOB=NUMBER, e.g. 'attn*=0.3'")
        out.append((pattern, number))
    return out


def is_marker(key: str) -> bool:
    return any(part in MARKER_NAMES or part.startswith(MARKER_PREFIXES) for part in key.split("."))


@dataclass(frozen=True)
class Strengths:
    places: KeyPlaces
    blocks: dict[str, float] = field(default_factory=dict)
    key_weights: tuple[tuple[str, float], ...] = ()
    te_ratio: float | None = None
    only: str | None = None  # "unet" | "te"

    def of(self, key: str) -> tuple[float, str]:
        """(strength, "") for a key to merge, or (0, reason) for one that keeps model A's value."""
        part = self.places.part(key)
        if self.only is not None and part != self.only:
            return 0.0, f"--only {self.only}"
        value = None
        for pattern, weight in self.key_weights:
            if fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(key, "*" + pattern):
                value = weight
        if value is None and part == "te" and self.te_ratio is not None:
            value = self.te_ratio
        if value is None:
            block = self.places.block(key) if self.blocks else None
            value = self.blocks.get(block, 1.0) if block is not None else 1.0
        return (value, "") if value != 0 else (0.0, "strength 0")


def _copy_reason(key: str, models: Sequence, holders: list[int], base, shape, dtype, mask) -> str:
    """Why `key` is copied rather than merged ("" when it is merged)."""
    if is_marker(key) or 0 in shape and dtype.is_floating_point:
        return "marker"
    if len(holders) < len(models):
        return "only in some inputs"
    if not dtype.is_floating_point or not all(m.dtype(key).is_floating_point for m in models):
        return "not float"
    if base is not None and (key not in base or tuple(base.shape(key)) != shape):
        return "not in base"
    if mask is not None and key not in mask:
        return "not in mask"
    return ""


def build_plan(models: Sequence, base, strengths: Strengths, *, uses_base: bool,
               save_dtype: torch.dtype | None, paths: Sequence[str], mask=None) -> MergePlan:
    """One KeyPlan per key of the union of the models' keys, in order of first appearance (A's first)."""
    keys = list(dict.fromkeys(k for m in models for k in m.keys()))
    plan = MergePlan()
    for key in keys:
        holders = [i for i, m in enumerate(models) if key in m]
        first = models[holders[0]]
        shape, dtype = tuple(first.shape(key)), first.dtype(key)
        for i in holders[1:]:
            if tuple(models[i].shape(key)) != shape:
                raise LoraToolsError(f"shape {tuple(models[i].shape(key))} differs from {shape} in {paths[holders[0]]}; "
                                     "the models are not the same architecture", file=paths[i], key=key)
        if mask is not None and key in mask and tuple(mask.shape(key)) != shape:
            raise LoraToolsError(f"the mask's shape {tuple(mask.shape(key))} differs from the model's {shape}",
                                 file=getattr(mask, "path", None), key=key)
        out_dtype = save_dtype if save_dtype is not None and dtype.is_floating_point else dtype

        why, source = _copy_reason(key, models, holders, base if uses_base else None, shape, dtype, mask), holders[0]
        strength = 0.0
        if not why:
            strength, why = strengths.of(key)
            source = 0
        if why in ("not float", "not in base", "not in mask"):
            source = 0
        if why:
            plan.keys.append(KeyPlan(key, False, source, dtype if why == "marker" else out_dtype, shape, 0.0, why))
        else:
            plan.keys.append(KeyPlan(key, True, 0, out_dtype, shape, strength))
    return plan
