"""Planning a merge of LoRAs into a checkpoint: which adapter changes which rows of which stored tensor.

Family-agnostic: a LoRA's modules are already on canonical targets (library.formats), and the
checkpoint's `CheckpointLayout` says where each target's rows are stored (one tensor, a row slice of
a fused tensor, or several tensors of a diffusers layout). The plan is built and checked before
anything is written, so a LoRA module that lands nowhere is reported — as an error unless the user
allows it — and `--dry_run` can print the plan without reading a single weight.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from library.block_weights import BlockWeights
from library.errors import LoraToolsError
from library.formats.checkpoint import CheckpointLayout, Placement
from library.formats.types import LoraFile, Module, Target
from library.formats.variants import adopt
from networks import adapter_from_tensors
from networks.base import Adapter

MAX_LISTED = 20


@dataclass
class LoraInput:
    """One `--models` entry: the read file, its strength and its optional block weights."""

    path: str
    lora: LoraFile
    ratio: float
    block_weights: BlockWeights | None = None

    def strength(self, module: Module) -> float:
        weight = self.block_weights.weight(self.lora.family, module.target.key) if self.block_weights else 1.0
        return self.ratio * weight


@dataclass
class Contribution:
    """`strength` × the adapter's delta on `target`, restricted to `placement` (rows of one stored tensor)."""

    source: str  # "file: module name"
    adapter: Adapter
    strength: float
    target: Target
    placement: Placement
    bias: bool = False  # the adapter's bias delta, on the bias tensor next to the weight
    bias_scale: float = 1.0  # a LoRA's own bias (`lora_up.bias`) is scaled by alpha/rank like its product

    def describe(self) -> str:
        rows = self.placement.target_rows
        part = f"[{rows[0]}:{rows[1]}]" if rows else ""
        ck = self.placement.checkpoint_rows
        where = self.placement.checkpoint_key + (f"[{ck[0]}:{ck[1]}]" if ck else "")
        what = "bias" if self.bias else self.adapter.describe()
        return f"{self.source}{part} ({what}) x{self.strength:g} -> {where}"


@dataclass
class Plan:
    family: str
    layout: CheckpointLayout
    contributions: dict[str, list[Contribution]] = field(default_factory=dict)  # stored key -> changes
    matched: list[tuple[str, str, str]] = field(default_factory=list)  # (file, module, component)
    zero: list[str] = field(default_factory=list)  # modules skipped: strength 0 (ratio or block weight)
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. a FLUX.1 LoRA's modulations dropped for Chroma

    def add(self, c: Contribution) -> None:
        self.contributions.setdefault(c.placement.checkpoint_key, []).append(c)

    def summary(self) -> list[str]:
        """One line per input file: modules matched per component, skipped at strength 0, unmatched."""
        lines = []
        files = dict.fromkeys(f for f, _m, _c in self.matched)
        for f in files:
            per = Counter(c for ff, _m, c in self.matched if ff == f)
            parts = ", ".join(f"{comp} {n}" for comp, n in sorted(per.items()))
            lines.append(f"{f}: {sum(per.values())} modules matched ({parts})")
        if self.zero:
            lines.append(f"{len(self.zero)} module(s) skipped at strength 0 (ratio or block weight)")
        touched = len(self.contributions)
        lines.append(f"{touched} stored tensor(s) will change; the rest are copied unchanged")
        return lines + self.notes

    def details(self) -> list[str]:
        return [c.describe() for key in self.contributions for c in self.contributions[key]]


def _fits(reader_shape: tuple[int, ...], placement: Placement, target: Target) -> bool:
    """Do the target rows `placement` names fit the stored tensor?"""
    if not reader_shape:
        return False
    t_rows = placement.target_rows or (0, target.shape[0])
    c_rows = placement.checkpoint_rows or (0, reader_shape[0])
    if c_rows[1] > reader_shape[0] or c_rows[1] - c_rows[0] != t_rows[1] - t_rows[0]:
        return False
    return math.prod(reader_shape[1:]) == math.prod(target.shape[1:])


def bias_scale(module: Module, adapter: Adapter) -> float:
    """The factor of a module's bias delta: a LoRA's own bias (`lora_up.bias`, PEFT's lora_B.bias) is scaled by
    alpha/rank like its product; a bias difference (`diff_b`, `b_norm`) is applied as stored."""
    own = "lora_up.bias" in module.tensors and "diff_b" not in module.tensors and "b_norm" not in module.tensors
    return adapter.scale if own else 1.0


def bias_key(weight_key: str) -> str:
    """The bias stored next to a weight (`….weight` → `….bias`, OpenCLIP `in_proj_weight` → `in_proj_bias`)."""
    if weight_key.endswith(".weight"):
        return weight_key[: -len("weight")] + "bias"
    if weight_key.endswith("_weight"):
        return weight_key[: -len("weight")] + "bias"
    return weight_key + ".bias"


def build_plan(reader, layout: CheckpointLayout, inputs: list[LoraInput], *, allow_unmatched: bool = False) -> Plan:
    """Place every module of every input on the checkpoint's stored tensors (see module docstring)."""
    family = layout.family.name
    plan = Plan(family, layout)
    keys = set(reader.keys())
    for inp in inputs:
        if inp.lora.family != family:  # a parent family's LoRA (FLUX.1 on Chroma) is adopted, others refused
            lora, notes = adopt(inp.lora, family, inp.path)
            inp = replace(inp, lora=lora)
            plan.notes.extend(notes)
        if inp.block_weights is not None:
            inp.block_weights.check_family(family, file=inp.path)
        for key in inp.lora.unmatched:
            plan.unmatched.append(f"{inp.path}: {key} (no target in {family})")
        for module in inp.lora.modules:
            _place_module(plan, reader, keys, inp, module)
    if plan.unmatched and not allow_unmatched:
        shown = "; ".join(plan.unmatched[:MAX_LISTED])
        more = f" (and {len(plan.unmatched) - MAX_LISTED} more)" if len(plan.unmatched) > MAX_LISTED else ""
        raise LoraToolsError(f"{len(plan.unmatched)} LoRA module(s) match no weight of the checkpoint: {shown}{more}; "
                             f"pass --allow_unmatched to skip them")
    return plan


def _place_module(plan: Plan, reader, keys: set[str], inp: LoraInput, module: Module) -> None:
    source = f"{inp.path}: {module.source or module.target.describe()}"
    strength = inp.strength(module)
    if strength == 0:
        plan.zero.append(source)
        return
    adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
    placements = plan.layout.placements(module.target)
    missing = [p.checkpoint_key for p in placements
               if p.checkpoint_key not in keys or not _fits(tuple(reader.shape(p.checkpoint_key)), p, module.target)]
    if not placements or missing:
        why = f"{', '.join(missing)} absent or of another shape" if missing else "no stored tensor"
        plan.unmatched.append(f"{source} -> {module.target.describe()} ({why})")
        return
    if adapter.dora is not None and len(placements) > 1:
        raise LoraToolsError("a DoRA module on a weight stored in several tensors is not supported",
                             file=inp.path, key=module.source)
    changes = []
    if adapter.kind != "full" or module.tensors.get("diff", module.tensors.get("w_norm")) is not None:
        changes += [Contribution(source, adapter, strength, module.target, p) for p in placements]
    if adapter.bias_delta is not None:
        for p in placements:
            bkey = bias_key(p.checkpoint_key)
            bp = Placement(bkey, p.checkpoint_rows, p.target_rows, p.swap)
            if bkey not in keys or tuple(reader.shape(bkey))[1:] != ():
                plan.unmatched.append(f"{source} -> {bkey} (bias delta, but the checkpoint has no such bias)")
                return
            changes.append(Contribution(source, adapter, strength, module.target, bp, bias=True,
                                        bias_scale=bias_scale(module, adapter)))
    for c in changes:
        plan.add(c)
    plan.matched.append((inp.path, module.source, module.target.component))


def family_hint(family: str | None, sdxl: bool = False, v2: bool = False) -> str | None:
    """The family --family / sd-scripts' --sdxl / --v2 name, refusing flags that contradict each other."""
    flagged = "sdxl" if sdxl else "sd2" if v2 else None
    if sdxl and v2:
        raise LoraToolsError("--sdxl and --v2 contradict each other")
    if family and flagged and family != flagged:
        raise LoraToolsError(f"--{'sdxl' if sdxl else 'v2'} contradicts --family {family}")
    return family or flagged


def choose_layout(reader, path: str, family: str | None = None, sdxl: bool = False, v2: bool = False):
    """The checkpoint's family and layout: detected, checked against --sdxl/--v2/--family; a checkpoint that
    holds only part of a model takes --family's partial layout."""
    from library.formats import FAMILIES
    from library.formats.checkpoint import detect_checkpoint_layout, partial_layout

    hint = family_hint(family, sdxl, v2)
    if family and family not in FAMILIES:
        raise LoraToolsError(f"unknown --family {family!r}; known: {', '.join(FAMILIES)}")
    layout = detect_checkpoint_layout(reader, family=family)
    if layout is None:
        if family:
            return partial_layout(reader, family) or CheckpointLayout(family)
        raise LoraToolsError("cannot tell which model family this checkpoint is; pass --family", file=path)
    if hint and layout.family.name != hint:
        flag = "--family" if family else "--sdxl" if sdxl else "--v2"
        raise LoraToolsError(f"{flag} says {hint} but the checkpoint is {layout.family.name}", file=path)
    return layout
