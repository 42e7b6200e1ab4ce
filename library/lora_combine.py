"""Several LoRAs → one LoRA, without a checkpoint: merge_lora.py's modes when `--sd_model` is absent.

- `concat` (exact): per target the factors are stacked, [w₁s₁·up₁ | … ] and [down₁; …], so the product is
  Σ wᵢ·sᵢ·upᵢ@downᵢ exactly (wᵢ = ratio × block weight, sᵢ = alphaᵢ/rankᵢ, negative wᵢ included); rank =
  Σ rankᵢ and alpha = rank (scale 1). LoHa/LoKr inputs join through their exact low-rank form
  (`exact_factors`, rank r₁·r₂) when that is smaller than the dense weight; otherwise, and where an input
  is a full diff, the target gets an exact dense `diff` module.
- `add`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (approximate): the method applied to the
  ups and to the downs separately (library.merge_methods.merge_factors: PEFT's non-SVD
  `add_weighted_adapter`, ComfyUI Power-Merge's LoRA Merger), equal ranks required. Each input's scale is
  split as √s on both factors so that one LoRA alone is kept exactly; with several, the product has cross
  terms upᵢ·downⱼ and the per-layer relative error against the exact Σ is measured (exactly, from factor
  Gram matrices). svd_merge_lora.py has the delta-space versions of these modes.
- `shuffle` (sd-scripts' `--shuffle`): a seeded random orthogonal Q per target, up·Q and Qᵀ·down: the
  product is unchanged, the constituent LoRAs can no longer be read off the factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from library.errors import LoraToolsError
from library.exact_lowrank import exact_rank, fits_as_factors
from library.formats.types import Module, Target
from library.lowrank import lowrank_fro_norm_sq, stack_factors
from library.merge_methods import MergeContext, generator_for, merge_factors
from library.merge_plan import LoraInput
from library.methods import FACTOR, names
from networks import adapter_from_tensors
from networks.base import Adapter

MODES = names(FACTOR)  # from the registry: concat and the factor-space methods


@dataclass
class Term:
    adapter: Adapter
    weight: float  # ratio × block weight
    rows: tuple[int, int]  # rows of the group's target this term covers
    source: str
    bias_scale: float = 1.0
    slot: int = 0  # index of the input file (svd_merge_lora seeds DARE masks per input position)


@dataclass
class Group:
    """All terms on one output target (a canonical weight, or a row slice of a fused one)."""

    target: Target
    terms: list[Term] = field(default_factory=list)


@dataclass
class LayerReport:
    target: str
    kind: str  # "lora" or "diff"
    rank: int | None
    relative_error: float  # ‖result − Σ wᵢΔWᵢ‖ / ‖Σ wᵢΔWᵢ‖ (0 for the exact modes)
    alpha: float | None = None


def group_targets(inputs: list[LoraInput]) -> tuple[str, list[Group]]:
    """Terms per output target. Inputs must share a family. Where two inputs cut the same weight into
    different, overlapping row slices (fused qkv in one file, q/k/v in another), every term of that
    weight is moved onto the whole weight (zero rows elsewhere: exact)."""
    families = {inp.lora.family for inp in inputs}
    if len(families) > 1:
        listed = ", ".join(f"{inp.path} is {inp.lora.family}" for inp in inputs)
        raise LoraToolsError(f"the LoRAs are for different model families ({listed})")
    family = families.pop()
    by_key: dict[str, list[tuple[Module, Term]]] = {}
    for slot, inp in enumerate(inputs):
        if inp.block_weights is not None:
            inp.block_weights.check_family(family, file=inp.path)
        for module in inp.lora.modules:
            w = inp.strength(module)
            if w == 0:
                continue
            source = f"{inp.path}: {module.source}"
            adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
            if adapter.dora is not None:
                raise LoraToolsError("DoRA modules depend on the base weight and cannot be merged into a LoRA; "
                                     "merge them into a checkpoint with --sd_model", file=inp.path, key=module.source)
            own_bias = "lora_up.bias" in module.tensors and "diff_b" not in module.tensors
            term = Term(adapter, w, (0, module.target.shape[0]), source, adapter.scale if own_bias else 1.0, slot)
            by_key.setdefault(module.target.key, []).append((module, term))
    groups: list[Group] = []
    for key, entries in by_key.items():
        spans = {m.target.rows or (0, m.target.shape[0]) for m, _ in entries}
        overlapping = any(a != b and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)
        if not overlapping:
            per: dict[tuple, Group] = {}
            for m, term in entries:
                per.setdefault(m.target.rows, Group(m.target)).terms.append(term)
            groups.extend(per.values())
            continue
        sample = entries[0][0].target
        full_rows = _full_rows(sample)
        whole = Target(key, None, sample.component, (full_rows, *sample.shape[1:]))
        group = Group(whole)
        for m, term in entries:
            start = m.target.rows[0] if m.target.rows else 0
            term.rows = (start, start + m.target.shape[0])
            group.terms.append(term)
        groups.append(group)
    return family, groups


def _full_rows(target: Target) -> int:
    from library.formats.registry import FAMILIES

    for fam in FAMILIES.values():
        shape = fam.table.shapes.get(target.key)
        if shape is not None:
            return shape[0]
    raise LoraToolsError("unknown canonical weight", key=target.key)


def _padded(t: torch.Tensor, rows: tuple[int, int], total: int) -> torch.Tensor:
    if rows == (0, total):
        return t
    out = torch.zeros((total, *t.shape[1:]), dtype=t.dtype)
    out[rows[0]:rows[1]] = t
    return out


def _factors(term: Term, total: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [total, r], down [r, in·k·k]) with the scale folded in (all on up, or √|s| on each side)."""
    up, down = term.adapter.factors()  # scale on up
    if symmetric:
        root = math.sqrt(abs(term.adapter.scale)) or 1.0
        up, down = up / root, down * root
    return _padded(up, term.rows, total), down


def _dense(term: Term, target: Target) -> torch.Tensor:
    n = term.rows[1] - term.rows[0]
    delta = term.adapter.delta((n, *target.shape[1:]))
    return _padded(delta, term.rows, target.shape[0])


def _bias(group: Group) -> torch.Tensor | None:
    terms = [t for t in group.terms if t.adapter.bias_delta is not None]
    if not terms:
        return None
    total = group.target.shape[0]
    return sum(_padded(t.adapter.bias_delta.float() * (t.weight * t.bias_scale), t.rows, total) for t in terms)


def _lora_tensors(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...],
                  alpha: float | None = None) -> dict[str, torch.Tensor]:
    rank = up.shape[1]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(rank) if alpha is None else alpha, dtype=torch.float32)}


def concat_rank(group: Group) -> int | None:
    """Rank of the exact concat of `group`, or None when it is written as a dense diff: a full diff among the
    terms, or LoHa/LoKr terms whose stacked factors would be larger than the dense weight itself
    (library.exact_lowrank.fits_as_factors, the rule the PEFT writer uses too)."""
    ranks = [exact_rank(t.adapter) for t in group.terms]
    if any(r is None for r in ranks):
        return None
    rank, shape = sum(ranks), group.target.shape
    if all(t.adapter.kind == "lora" for t in group.terms):
        return rank  # plain LoRAs are always stacked (kohya's concat), whatever the size
    return rank if fits_as_factors(rank, shape) else None


def concat_elements(group: Group) -> int:
    """Number of values the concat of `group` writes (factors, or the dense diff)."""
    rank, shape = concat_rank(group), group.target.shape
    return math.prod(shape) if rank is None else rank * (shape[0] + math.prod(shape[1:]))


def _unscaled_factors(term: Term) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = ΔW / scale (flattened); any Tucker core folded into down."""
    if term.adapter.kind == "lora":
        up = term.adapter.up
        return up.float().reshape(up.shape[0], -1), term.adapter.factors()[1]
    up, down = term.adapter.exact_factors()  # float64; rounding to float32 here is below any stored dtype's
    return up.float(), down.float()


def _concat(terms: list[Term], total: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Stacked factors and alpha with (alpha/R)·up@down = Σ wᵢsᵢ·upᵢ@downᵢ exactly.

    The common factor c = |w₁s₁| goes into alpha (= c·R) and only the ratios wᵢsᵢ/c into the ups, so
    inputs that share a strength and scale keep their factors bit for bit (no rounding on save).
    """
    coefs = [t.weight * t.adapter.scale for t in terms]
    common = next((abs(c) for c in coefs if c != 0), 1.0)
    ups, downs = [], []
    for t in terms:
        up, down = _unscaled_factors(t)
        ups.append(_padded(up, t.rows, total))
        downs.append(down)
    up, down = stack_factors(ups, downs, [c / common for c in coefs])
    return up, down, common * up.shape[1]


def _shuffled(up: torch.Tensor, down: torch.Tensor, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """up·Q, Qᵀ·down for a random orthogonal Q drawn from (seed, target): the product is unchanged."""
    rank = up.shape[1]
    g = generator_for(seed, f"{name}:shuffle")
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed, not biased by QR's sign convention
    return (up.double() @ q).float(), (q.T @ down.double()).float()


def combine(groups: list[Group], mode: str = "concat", *, density: float = 1.0, sign_method: str = "total",
            seed: int = 0, shuffle: bool = False, measure: bool = True,
            params: dict | None = None) -> tuple[list[Module], list[LayerReport]]:
    """The merged modules and a report per target (see module docstring)."""
    if mode not in MODES:
        raise LoraToolsError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
    modules: list[Module] = []
    reports: list[LayerReport] = []
    for group in groups:
        target, total = group.target, group.target.shape[0]
        name = target.describe()
        low_rank = concat_rank(group) is not None if mode == "concat" else all(
            t.adapter.kind == "lora" for t in group.terms)
        weights = [t.weight for t in group.terms]
        if not low_rank:
            if mode != "concat":
                kinds = sorted({t.adapter.kind for t in group.terms})
                raise LoraToolsError(f"--mode {mode} works on LoRA factors; this weight has {', '.join(kinds)} "
                                     f"adapters (use --mode concat for an exact diff, or svd_merge_lora.py)", key=name)
            dense = sum(t.weight * _dense(t, target) for t in group.terms)
            tensors = {"diff": dense.reshape(target.shape).contiguous()}
            reports.append(LayerReport(name, "diff", None, 0.0, None))
        else:
            alpha = None
            if mode == "concat":
                up, down, alpha = _concat(group.terms, total)
                error = 0.0
            else:
                ups, downs = zip(*(_factors(t, total, symmetric=True) for t in group.terms))
                ctx = MergeContext(density=density, sign_method=sign_method, seed=seed, name=name, **(params or {}))
                up, down = merge_factors(mode, list(ups), list(downs), weights, ctx)
                error = _relative_error(up, down, ups, downs, weights) if measure else float("nan")
            if shuffle:
                up, down = _shuffled(up, down, seed, name)
            tensors = _lora_tensors(up, down, target.shape, alpha)
            reports.append(LayerReport(name, "lora", int(up.shape[1]), error, float(tensors["alpha"])))
        bias = _bias(group)
        if bias is not None:
            tensors["diff_b"] = bias
        modules.append(Module(target, tensors, name))
    return modules, reports


def _relative_error(up, down, ups, downs, weights) -> float:
    """‖up@down − Σ wᵢ upᵢ@downᵢ‖ / ‖Σ wᵢ upᵢ@downᵢ‖, exactly, without forming either matrix."""
    exact = float(lowrank_fro_norm_sq(list(ups), list(downs), list(weights)))
    diff = float(lowrank_fro_norm_sq([up, *ups], [down, *downs], [1.0, *(-w for w in weights)]))
    return math.sqrt(max(diff, 0.0) / exact) if exact > 0 else 0.0
