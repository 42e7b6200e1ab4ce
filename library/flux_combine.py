"""Several LoRAs into one LoRA, on canonical targets (the LoRA+LoRA mode of flux_merge_lora.py).

Inputs of any format meet on canonical targets; where two files cover different row slices of a fused
weight (a kohya `qkv` module and a diffusers `to_k` one), each module is widened exactly to the whole
weight (formats.regroup.fuse: zero rows elsewhere) so that they can be combined. Modes:

- concat (exact): factors stacked along the rank, ratios and scales folded into the ups; alpha = rank.
- add / ties / dare_linear / dare_ties / magnitude_prune: the factor-space methods of merge_methods
  (Power-Merge semantics; approximate: cross terms between ups and downs). Equal ranks per target.
- svd and the *_svd modes: delta-space merge then optimal truncation to --new_rank (library.svd_merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.errors import LoraToolsError
from library.flux_merge import Weighted, by_key
from library.formats import FAMILIES, Module, Target
from library.formats.regroup import fuse
from library.merge_methods import MergeContext, get_method, merge_factors
from library.svd_merge import LayerJob, MergeSettings, merge_layers
from networks import adapter_from_tensors

FACTOR_MODES = ("add", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_MODES = ("svd", "add_svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MODES = ("concat", *FACTOR_MODES, *SVD_MODES)


@dataclass
class CombineSettings:
    mode: str = "concat"
    new_rank: int | None = None
    density: float = 1.0
    sign_method: str = "total"
    seed: int = 0
    device: torch.device = torch.device("cpu")


def unify(key: str, group: list[Weighted], family: str) -> tuple[Target, list[tuple[Weighted, dict]]]:
    """The modules of one weight on one common target: their own when all cover the same rows, else the
    whole weight (each widened exactly with zero rows)."""
    spans = {w.module.target.rows for w in group}
    if len(spans) == 1:
        return group[0].module.target, [(w, w.module.tensors) for w in group]
    table = FAMILIES[family].table
    full = table.shapes[key]
    target = Target(key, None, table.components[key], tuple(full))
    out = []
    for w in group:
        rows = w.module.target.full_rows
        t = w.module.tensors if rows == (0, full[0]) else fuse([(rows, w.module.tensors)], full[0], tuple(full),
                                                                  w.module.source)
        out.append((w, t))
    return target, out


def _adapter(w: Weighted, tensors: dict):
    return adapter_from_tensors(tensors, w.module.source, dora_axis=w.module.dora_axis)


def _no_dora(key: str, adapters) -> None:
    if any(a.dora is not None for a in adapters):
        raise LoraToolsError("DoRA module: its change depends on the base weight and cannot be combined with "
                             "other modules or rescaled in a LoRA; merge it into the checkpoint (--flux_model)", key=key)


def _lora_tensors(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int], alpha: float) -> dict[str, torch.Tensor]:
    r = down.shape[0]
    extra = [1] * (len(shape) - 2)
    return {"lora_up.weight": up.reshape(shape[0], r, *extra).contiguous(),
            "lora_down.weight": down.reshape(r, *shape[1:]).contiguous(),
            "alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def _bias_sum(parts: list[tuple[Weighted, dict]], adapters) -> torch.Tensor | None:
    """Σ ratio·bias change (scale applied to PEFT's lora_B.bias), or None when no module has one."""
    total = None
    for (w, t), a in zip(parts, adapters, strict=True):
        b = t["lora_up.bias"].float() * a.scale if "lora_up.bias" in t else a.bias_delta
        if b is not None:
            total = w.ratio * b.float() if total is None else total + w.ratio * b.float()
    return total


def _scaled_single(w: Weighted, tensors: dict, key: str) -> dict[str, torch.Tensor]:
    """One LoHa/LoKr/full module at strength `ratio` (its delta is linear in one factor)."""
    if w.ratio == 1.0:
        return dict(tensors)
    out = dict(tensors)
    for name in ("hada_w1_a", "lokr_w1", "lokr_w1_a", "diff"):
        if name in out:
            out[name] = (out[name].float() * w.ratio).to(out[name].dtype)
            break
    else:
        raise LoraToolsError("cannot scale this module", key=key)
    for name in ("diff_b", "lora_up.bias"):
        if name in out:
            out[name] = (out[name].float() * w.ratio).to(out[name].dtype)
    return out


def concat(key: str, target: Target, parts: list[tuple[Weighted, dict]]) -> dict[str, torch.Tensor]:
    adapters = [_adapter(w, t) for w, t in parts]
    if len(parts) == 1 and adapters[0].dora is not None and parts[0][0].ratio == 1.0:
        return dict(parts[0][1])  # a DoRA module alone at strength 1 is kept exactly as trained
    _no_dora(key, adapters)
    if any(a.kind != "lora" for a in adapters):
        if len(parts) == 1:
            return _scaled_single(parts[0][0], parts[0][1], key)
        kinds = sorted({a.kind for a in adapters})
        raise LoraToolsError(f"concat stacks LoRA factors; this weight has {', '.join(kinds)} modules from several "
                             f"files: use --mode svd (or merge into the checkpoint)", key=key)
    ups, downs = [], []
    for (w, _t), a in zip(parts, adapters, strict=True):
        up, down = a.factors()
        ups.append(up * w.ratio)
        downs.append(down)
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    out = _lora_tensors(up, down, target.shape, down.shape[0])
    bias = _bias_sum(parts, adapters)
    if bias is not None:
        out["lora_up.bias"] = bias
    return out


def factor_merge(key: str, target: Target, parts: list[tuple[Weighted, dict]], settings: CombineSettings) \
        -> dict[str, torch.Tensor]:
    adapters = [_adapter(w, t) for w, t in parts]
    _no_dora(key, adapters)
    if any(a.kind != "lora" for a in adapters):
        raise LoraToolsError(f"--mode {settings.mode} works on LoRA factors; this weight has "
                             f"{', '.join(sorted({a.kind for a in adapters}))} modules: use --mode svd", key=key)
    ups, downs = zip(*(a.factors() for a in adapters), strict=True)
    ctx = MergeContext(density=settings.density, sign_method=settings.sign_method, seed=settings.seed, name=key)
    up, down = merge_factors(settings.mode, list(ups), list(downs), [w.ratio for w, _ in parts], ctx)
    out = _lora_tensors(up, down, target.shape, down.shape[0])
    bias = _bias_sum(parts, adapters)
    if bias is not None:
        out["lora_up.bias"] = bias
    return out


def combine(items: Sequence[Weighted], family: str, settings: CombineSettings, n_inputs: int,
            progress=lambda it, **_: it) -> list[Module]:
    """One module per canonical weight from all weighted input modules."""
    mode = settings.mode
    if mode not in MODES:
        raise LoraToolsError(f"unknown --mode {mode!r}; one of {', '.join(MODES)}")
    groups = by_key(items)
    unified = {key: unify(key, group, family) for key, group in groups.items()}
    if mode in SVD_MODES:
        if settings.new_rank is None:
            raise LoraToolsError(f"--mode {mode} needs --new_rank")
        method = "add" if mode == "svd" else get_method(mode).name
        ms = MergeSettings(mode=method, new_rank=settings.new_rank, density=settings.density,
                           sign_method=settings.sign_method, seed=settings.seed, device=settings.device)
        jobs = [LayerJob(key, tuple(target.shape), [(w.index, _adapter(w, t), w.ratio) for w, t in parts], n_inputs)
                for key, (target, parts) in unified.items()]
        results = merge_layers(jobs, ms)
        out = []
        for key, (target, _parts) in unified.items():
            r = results[key]
            tensors = {"lora_up.weight": r.up, "lora_down.weight": r.down,
                       "alpha": torch.tensor(float(r.alpha), dtype=torch.float32)}
            if r.bias is not None:
                tensors["diff_b"] = r.bias
            out.append(Module(target, tensors, key))
        return out
    if mode != "concat":
        get_method(mode)  # validates the name against the shared registry
    out = []
    for key, (target, parts) in progress(unified.items(), desc=mode, total=len(unified)):
        tensors = concat(key, target, parts) if mode == "concat" else factor_merge(key, target, parts, settings)
        out.append(Module(target, tensors, key))
    return out


def shuffle(modules: list[Module], seed: int) -> list[Module]:
    """sd-scripts' --shuffle: mix the rank columns of each LoRA with a random orthogonal matrix Q
    (up·Q, Qᵀ·down): the product, hence the delta, is unchanged; seeded by (seed, target)."""
    from library.merge_methods import generator_for

    out = []
    for m in modules:
        t = dict(m.tensors)
        if "lora_up.weight" in t and "lora_mid.weight" not in t:
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            r = down.shape[0]
            g = generator_for(seed, m.target.describe())
            q, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
            up2 = (up.reshape(up.shape[0], r).double() @ q).to(up.dtype).reshape(up.shape)
            down2 = (q.T @ down.reshape(r, -1).double()).to(down.dtype).reshape(down.shape)
            t["lora_up.weight"], t["lora_down.weight"] = up2, down2
        out.append(Module(m.target, t, m.source, m.dora_axis))
    return out
