"""Exact figures of LoRA deltas from their factors: Frobenius norms, inner products and cosines, the top
singular subspaces, and the sign-conflict rate (the one figure that needs the dense delta, one row chunk at
a time). What `lora_info.py --plot` and `lora_compare.py` report.

Every delta is held as a pair (up [m, r], down [r, n]) in float64 with up @ down = ΔW flattened to
[out, in·kh·kw], the alpha/rank scale included (strength is the user's and not part of a file's delta).
LoRA/LoCon/Tucker give their factors, LoHa/LoKr their exact low-rank form (`exact_factors`, rank r₁·r₂),
a full diff the pair (I, D) or (D, I). Then
    ⟨U₁V₁, U₂V₂⟩_F = Σ (U₁ᵀU₂) ⊙ (V₁V₂ᵀ)        ‖UV‖_F² = Σ (UᵀU) ⊙ (VVᵀ)
cost O((m+n)·r₁·r₂) and never build an m×n matrix. DoRA modules count with their low-rank direction
(their final delta depends on the base weight, which a LoRA file does not hold).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from library.block_weights import webui_block
from library.formats.registry import FAMILIES
from library.formats.types import LoraFile
from library.lowrank import factored_svd
from library.merge_plan import bias_key, bias_scale
from networks import adapter_from_tensors
from networks.base import Adapter, identity_factors

OTHER_BLOCK = "other"  # weights outside every block (time embeddings, conv_in/out, final layers)
SIGN_CHUNK = 1 << 22  # entries of one dense row chunk in the sign-conflict count (32 MiB in float64 per delta)


@dataclass
class Factored:
    """ΔW = up @ down, float64, flattened to 2-D; `shape` is the weight's own shape."""

    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]

    def norm_sq(self) -> float:
        return inner(self, self)

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


def adapter_factors(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) in float64 with up @ down = the adapter's ΔW (scale included); None for a bias-only module."""
    if adapter.kind == "lora":
        up, down = adapter.factors()  # scale folded into up
        return up.double(), down.double()
    if hasattr(adapter, "exact_factors"):
        up, down = adapter.exact_factors()  # ΔW / scale, exact in float64
        return up * adapter.scale, down
    if getattr(adapter, "diff", None) is None:
        return None
    diff = adapter.diff.double()
    return identity_factors(diff.reshape(diff.shape[0], -1))


def inner(a: Factored, b: Factored) -> float:
    """⟨ΔA, ΔB⟩_F exactly from the factors: Σ (Aᵤᵀ Bᵤ) ⊙ (A_d B_dᵀ), two small Gram-like products."""
    return float(((a.up.T @ b.up) * (a.down @ b.down.T)).sum())


def fro_norm(a: Factored) -> float:
    return math.sqrt(max(a.norm_sq(), 0.0))


def cosine(a: Factored, b: Factored) -> float | None:
    """⟨ΔA, ΔB⟩ / (‖ΔA‖‖ΔB‖); None when either delta is zero."""
    na, nb = fro_norm(a), fro_norm(b)
    return inner(a, b) / (na * nb) if na > 0 and nb > 0 else None


def top_directions(a: Factored, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The left [m, k'] and right [n, k'] singular vectors of the k' ≤ k largest non-zero singular values,
    from the exact factored SVD (QR of each factor, SVD of the r×r core)."""
    U, S, Vh = factored_svd(a.up, a.down, dtype=torch.float64)
    keep = int((S[0] * 1e-10 < S).sum()) if S.numel() and S[0] > 0 else 0
    keep = min(keep, k)
    return U[:, :keep], Vh[:keep].T


def subspace_overlap(a: Factored, b: Factored, k: int) -> tuple[float, float] | None:
    """(output side, input side) overlap of the top-k singular subspaces: ‖U_Aᵀ U_B‖_F² / k', the mean
    squared cosine of the principal angles (1 = same subspace, 0 = orthogonal), k' = min(k, both non-zero
    ranks). None when a delta is zero."""
    ua, va = top_directions(a, k)
    ub, vb = top_directions(b, k)
    kk = min(ua.shape[1], ub.shape[1])
    if kk == 0:
        return None
    ua, va, ub, vb = ua[:, :kk], va[:, :kk], ub[:, :kk], vb[:, :kk]
    # min(1, ·): orthonormal bases give at most 1; rounding may add an ulp or two
    return min(1.0, float((ua.T @ ub).pow(2).sum()) / kk), min(1.0, float((va.T @ vb).pow(2).sum()) / kk)


def sign_conflicts(a: Factored, b: Factored, chunk: int = SIGN_CHUNK) -> tuple[int, int]:
    """(entries where ΔA·ΔB < 0, entries): signs of a product have no factored form, so the dense deltas
    of this one layer are built a block of rows at a time (at most `chunk` entries each)."""
    m, n = a.up.shape[0], a.down.shape[1]
    rows = max(1, chunk // max(n, 1))
    count = 0
    for start in range(0, m, rows):
        da = a.up[start:start + rows] @ a.down
        db = b.up[start:start + rows] @ b.down
        count += int(torch.mul(da, db, out=da).lt_(0).sum())  # in place: one chunk-sized buffer less
    return count, m * n


def target_factors(lora: LoraFile, keys: set[str] | None = None) -> dict[str, Factored]:
    """The file's delta per canonical weight (only `keys` when given): every module on that weight (q/k/v
    slices of a fused qkv included) stacked into one pair, ups padded to the whole weight's rows (exact:
    zero rows elsewhere)."""
    table = FAMILIES[lora.family].table.shapes
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for module in lora.modules:
        if keys is not None and module.target.key not in keys:
            continue
        adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
        pair = adapter_factors(adapter)
        if pair is None:
            continue
        target = module.target
        shape = tuple(table.get(target.key, target.shape)) if target.rows else tuple(target.shape)
        up, down = pair
        if target.rows:
            padded = torch.zeros(shape[0], up.shape[1], dtype=up.dtype)
            padded[target.rows[0]:target.rows[1]] = up
            up = padded
        parts.setdefault(target.key, []).append((up, down))
        shapes[target.key] = shape
    return {key: Factored(torch.cat([u for u, _ in pairs], 1), torch.cat([d for _, d in pairs], 0), shapes[key])
            for key, pairs in parts.items()}


def target_biases(lora: LoraFile) -> dict[str, Factored]:
    """The file's bias delta per canonical bias key (`….weight` → `….bias`) as an [out, 1] delta (up = the
    summed bias columns, down = ones), scaled as a merge applies it (merge_plan.bias_scale); slices of a fused
    weight padded to its rows. A bias is a parameter of its own, so it is compared as its own row."""
    table = FAMILIES[lora.family].table.shapes
    columns: dict[str, list[torch.Tensor]] = {}
    for module in lora.modules:
        adapter = adapter_from_tensors(module.tensors, module.source, dora_axis=module.dora_axis)
        if adapter.bias_delta is None:
            continue
        target = module.target
        column = adapter.bias_delta.double().reshape(-1, 1) * bias_scale(module, adapter)
        if target.rows:
            padded = torch.zeros(tuple(table.get(target.key, target.shape))[0], 1, dtype=torch.float64)
            padded[target.rows[0]:target.rows[1]] = column
            column = padded
        columns.setdefault(bias_key(target.key), []).append(column)
    return {key: Factored(torch.cat(cols, 1), torch.ones(len(cols), 1, dtype=torch.float64), (cols[0].shape[0],))
            for key, cols in columns.items()}


def block_of(family: str, key: str) -> str:
    """The lbw block name (SD/SDXL: BASE, IN04, M00, OUT03…; Flux: CLIP, T5, IN, D00…, S00…, OUT), or the
    family's block id (J00… for SD3, …), or "other"."""
    return webui_block(family, key) or OTHER_BLOCK


def block_order(family: str, blocks) -> list[str]:
    """`blocks` in the family's layout order (the lbw layout where there is one, else natural order)."""
    lbw = FAMILIES[family].block_weights
    rank = {name: i for i, name in enumerate(lbw.full)} if lbw is not None else {}

    def key(name: str):
        if name == OTHER_BLOCK:
            return (2, 0, name)
        if name in rank:
            return (0, rank[name], name)
        digits = "".join(c for c in name if c.isdigit())
        return (0 if name == "BASE" else 1, int(digits) if digits else -1, name)

    return sorted(set(blocks), key=key)


def adapter_norm(adapter: Adapter) -> float:
    """‖ΔW‖_F of one module from its factors (0 for a bias-only module)."""
    pair = adapter_factors(adapter)
    return 0.0 if pair is None else fro_norm(Factored(*pair, ()))


def block_norms(lora: LoraFile, layers: list[dict]) -> list[dict]:
    """`layers`: one dict per module of `lora`, in its order, with "block", "norm", "rank" and "alpha".
    Per block, in layout order: ‖ΔW‖_F of the whole block (√ of Σ over its weights of the exact squared
    norm of each weight's summed delta), module count, mean rank and mean alpha (alpha absent = rank)."""
    sq: dict[str, float] = {}
    per_key = Counter(m.target.key for m in lora.modules)
    for module, layer in zip(lora.modules, layers, strict=True):
        if per_key[module.target.key] == 1:  # a weight with one module: its norm is already measured
            sq[layer["block"]] = sq.get(layer["block"], 0.0) + layer["norm"] ** 2
    # Several modules on one weight (slices, or a file that repeats a target): the norm of their sum.
    for key, factored in target_factors(lora, {k for k, n in per_key.items() if n > 1}).items():
        block = block_of(lora.family, key)
        sq[block] = sq.get(block, 0.0) + max(factored.norm_sq(), 0.0)
    members: dict[str, list[dict]] = {}
    for layer in layers:
        members.setdefault(layer["block"], []).append(layer)
    out = []
    for block in block_order(lora.family, members):
        group = members[block]
        ranks = [m["rank"] for m in group if m["rank"] is not None]
        alphas = [m["alpha"] if m["alpha"] is not None else m["rank"] for m in group if m["rank"] is not None]
        out.append({"block": block, "norm": math.sqrt(sq.get(block, 0.0)), "modules": len(group),
                    "mean_rank": sum(ranks) / len(ranks) if ranks else None,
                    "mean_alpha": sum(alphas) / len(alphas) if alphas else None})
    return out


def compare_pair(a: dict[str, Factored], b: dict[str, Factored], family: str, top_k: int = 8) -> dict:
    """Per shared weight and overall: cosine, relative norm ‖ΔB‖/‖ΔA‖, top-k subspace overlaps (output and
    input side) and sign-conflict rate; weights only one file touches are listed, not scored."""
    shared = [k for k in a if k in b]
    layers = []
    tot_ab = tot_aa = tot_bb = 0.0
    tot_conf = tot_n = 0
    for key in shared:
        fa, fb = a[key], b[key]
        ab, aa, bb = inner(fa, fb), max(fa.norm_sq(), 0.0), max(fb.norm_sq(), 0.0)
        conflicts, entries = sign_conflicts(fa, fb)
        overlap = subspace_overlap(fa, fb, top_k)
        layers.append({"target": key, "block": block_of(family, key),
                       "cosine": ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None,
                       "relative_norm": math.sqrt(bb / aa) if aa > 0 else None,
                       "overlap_out": overlap[0] if overlap else None,
                       "overlap_in": overlap[1] if overlap else None,
                       "sign_conflict": conflicts / entries if entries else None})
        tot_ab, tot_aa, tot_bb = tot_ab + ab, tot_aa + aa, tot_bb + bb
        tot_conf, tot_n = tot_conf + conflicts, tot_n + entries
    order = {b: i for i, b in enumerate(block_order(family, [row["block"] for row in layers]))}
    layers.sort(key=lambda row: (order[row["block"]], row["target"]))
    # Overall figures count every weight either file touches: a weight only one file changes adds to its norm.
    all_aa = tot_aa + sum(max(a[k].norm_sq(), 0.0) for k in a if k not in b)
    all_bb = tot_bb + sum(max(b[k].norm_sq(), 0.0) for k in b if k not in a)
    overall = {"cosine": tot_ab / math.sqrt(all_aa * all_bb) if all_aa > 0 and all_bb > 0 else None,
               "relative_norm": math.sqrt(all_bb / all_aa) if all_aa > 0 else None,
               "sign_conflict": tot_conf / tot_n if tot_n else None, "shared_layers": len(shared)}
    return {"overall": overall, "layers": layers,
            "only_in_a": sorted(k for k in a if k not in b), "only_in_b": sorted(k for k in b if k not in a)}
