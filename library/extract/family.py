"""Family naming of an extracted LoRA: checkpoint keys → canonical targets → the format's own modules.

`library.formats` knows, per family, where each canonical target lives in a checkpoint
(`CheckpointLayout`) and how each output format names it (`lora_tensors`). Extraction works on the
checkpoint's tensors, so the plan is made per *output module*: a fused checkpoint weight whose output
naming splits it (OpenCLIP `in_proj_weight` → kohya q/k/v) is extracted slice by slice, each at the
full rank (as sd-scripts does, and better than splitting one rank-r fit of the fused weight), while
checkpoint tensors that are slices of one canonical weight (diffusers-layout Flux `to_q`/`to_k`/`to_v`)
are extracted one by one and fused exactly by the writer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from library.errors import LoraToolsError
from library.extract.layers import ExtractedLayer
from library.extract.pairs import CheckpointPair
from library.formats import FAMILIES, Module, Target, lora_tensors
from library.formats.checkpoint import detect_checkpoint_layout, layout_by_keys


def _bias_key(weight_key: str) -> str | None:
    for ending, bias in ((".weight", ".bias"), ("_weight", "_bias")):
        if weight_key.endswith(ending):
            return weight_key[: -len(ending)] + bias
    return None


class FamilyNaming:
    """Output modules of a known family in one of its formats (kohya, diffusers, ai-toolkit, comfy)."""

    def __init__(self, pair: CheckpointPair, family: str, fmt: str):
        self.family = family
        self.fmt = fmt
        fam = FAMILIES[family]
        if fmt not in fam.write:
            raise LoraToolsError(f"cannot write {fmt!r} for {family}; formats: {', '.join(fam.write)}")
        self.layout = detect_checkpoint_layout(pair.base, family) or layout_by_keys(pair.base, family)
        if self.layout is None:
            raise LoraToolsError(f"the checkpoint does not have the layout of a {family} model", file=pair.base_path)
        tuned_layout = detect_checkpoint_layout(pair.tuned, family) or layout_by_keys(pair.tuned, family)
        if tuned_layout is None or tuned_layout.name != self.layout.name:
            raise LoraToolsError(f"the base model has the {self.layout.name} layout but the tuned model "
                                 f"{'has ' + tuned_layout.name if tuned_layout else 'does not fit it'}; convert one "
                                 "of them first", file=pair.tuned_path)
        self.table = fam.table
        self.write_specs = fam.write[fmt]
        self._targets: dict[str, tuple[Target, bool]] = {}
        self._bias_of: dict[str, str] = {}  # bias key -> its weight's checkpoint key

    def prepare(self, keys: Sequence[str]) -> None:
        self._targets = self.layout.targets(keys)
        present = set(keys)
        for weight_key in self._targets:
            bias = _bias_key(weight_key)
            if bias in present:
                self._bias_of[bias] = weight_key

    def _weight_key(self, key: str) -> str | None:
        return key if key in self._targets else self._bias_of.get(key)

    def accepts(self, key: str) -> bool:
        weight = self._weight_key(key)
        if weight is None:
            return False
        target = self._targets[weight][0]
        spec = self.write_specs.get(target.component)
        return spec is not None and bool(self.table.by_key[spec.naming].get(target.key))

    def rejected(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        return [(k, f"no module of the {self.family} {self.fmt} naming") for k in keys if not self.accepts(k)]

    def targets_of(self, key: str) -> list[tuple[str, tuple[int, int] | None, object | None]]:
        """(output module name, checkpoint rows, (Target, swap)) per output module fed by this checkpoint key."""
        weight = self._weight_key(key)
        target, swap = self._targets[weight]
        spec = self.write_specs[target.component]
        slots = self.table.by_key[spec.naming][target.key]
        if target.rows is not None or len(slots) <= 1 or swap:
            # one module, or one slice of a fused canonical weight that the writer fuses with its siblings
            return [(self._name(spec, slots, target.full_rows if target.rows else None), None, (target, swap))]
        out = []
        for path, slot in slots:
            rows = slot.rows or (0, target.shape[0])
            sliced = Target(target.key, rows, target.component, (rows[1] - rows[0], *target.shape[1:]))
            out.append((self._name(spec, [(path, slot)], None), rows, (sliced, False)))
        return out

    @staticmethod
    def _name(spec, slots, rows: tuple[int, int] | None) -> str:
        """The output module that holds `rows` of the canonical weight (for listings; the writer names the tensors)."""
        for path, slot in slots:
            start, stop = slot.rows or (0, 1 << 62)
            if rows is None or (start <= rows[0] and rows[1] <= stop):
                return spec.prefix + (path.replace(".", "_") if spec.flat else path)
        return spec.prefix + slots[0][0]

    def describe(self) -> str:
        return f"{self.family} {self.fmt} naming, checkpoint layout {self.layout.name}"

    def tensors(self, results: Sequence[ExtractedLayer]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        modules: dict[tuple[str, tuple[int, int] | None], Module] = {}
        for result in results:
            target, swap = result.task.target
            tensors = dict(result.tensors)
            if swap:
                tensors = _unswap(tensors, result.task.key)
            slot = (target.key, target.rows)
            if slot not in modules:
                modules[slot] = Module(target=target, tensors={}, source=result.task.key)
            modules[slot].tensors.update(tensors)
        return lora_tensors(list(modules.values()), self.family, self.fmt)


def _unswap(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """Checkpoint halves in the other order than the canonical weight (diffusers Flux `norm_out.linear`):
    swapping the output rows of up / diff / diff_b gives the canonical module."""
    out = dict(tensors)
    for suffix in ("lora_up.weight", "diff", "diff_b"):
        if suffix in out:
            t = out[suffix]
            half = t.shape[0] // 2
            out[suffix] = torch.cat([t[half:], t[:half]])
    return out
