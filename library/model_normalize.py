"""--normalize (DareMerge's Normalize Model): scale the other models' parameters to model A's norms before
they are merged, so that a model trained to larger weights does not dominate the merge by its scale.

  layer      every tensor of models B… is multiplied by ‖A‖/‖Mᵢ‖ (Frobenius, per tensor).
  attn_only  only attention queries and keys: Qᵢ ×= s and Kᵢ ÷= s with s = ‖A_Q‖/‖Qᵢ‖ (of the query
             weights), so every QᵢKᵢᵀ, and therefore the attention, is unchanged; biases of Q and K
             follow their weights. Separate projections (`to_q`/`to_k`, `q_proj`/`k_proj`,
             `add_q_proj`/`add_k_proj`) and fused ones (rows [0, H) and [H, 2H) of `qkv`,
             `in_proj_weight` and Flux's single-block `linear1`) are both covered.
Unlike DareMerge, attn_only leaves `to_out` alone (that would change the output scale) and covers every
transformer block of every family, not only SD1.5's `transformer_blocks.0`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

NORMALIZE_MODES = ("layer", "attn_only")
_SEPARATE = re.compile(r"^(.*\.)(to_q|to_k|q_proj|k_proj|add_q_proj|add_k_proj)\.(weight|bias)$")
_PARTNER = {"to_q": "to_k", "q_proj": "k_proj", "add_q_proj": "add_k_proj"}
_FUSED = re.compile(r"^(.*(?:\.qkv|\.in_proj|\.linear1))(?:\.weight|_weight|\.bias|_bias)$")


def _query_of(key: str) -> tuple[str, str] | None:
    """(query weight key, role) of an attention Q/K tensor with separate projections, role "q" or "k"."""
    m = _SEPARATE.match(key)
    if not m:
        return None
    head, proj = m[1], m[2]
    query = proj if proj in _PARTNER else next(q for q, k in _PARTNER.items() if k == proj)
    return f"{head}{query}.weight", "q" if proj in _PARTNER else "k"


def _fused_weight_key(key: str) -> str | None:
    m = _FUSED.match(key)
    if not m:
        return None
    return m[1] + ("_weight" if key.endswith(("_weight", "_bias")) else ".weight")


Segments = tuple[tuple[int, int, float, bool], ...]  # (flat start, stop, factor, divide) of one model's tensor
NormOf = Callable[[str, int, int], float | None]  # (key, model index, leading flat elements) → ‖…‖, None if absent


def flat_norm(read: Callable[[int, int], torch.Tensor], count: int) -> float:
    """‖x‖ of the first `count` flat elements that `read(start, stop)` gives, from float64 sums over fixed
    blocks in order: the chunked merge and the whole-tensor one get the same value."""
    from library.model_merge_chunked import STATS_BLOCK

    total = 0.0
    for start in range(0, count, STATS_BLOCK):
        x = read(start, min(count, start + STATS_BLOCK)).double()
        total += float(torch.dot(x, x))
    return total ** 0.5


def _ratio(norm_of: NormOf, key: str, i: int, count: int) -> float | None:
    target, norm = norm_of(key, 0, count), norm_of(key, i, count)
    if target is None or norm is None:
        return None
    return target / norm if norm > 0 else 1.0


def _hidden(weight_shape: Sequence[int]) -> int:
    """H of a fused q,k,v(,mlp) weight: its input width (qkv: 3H × H; Flux linear1: 3H + mlp × H)."""
    return int(weight_shape[1])


def scalings(key: str, shape: Sequence[int], n_models: int, mode: str | None, norm_of: NormOf,
             shape_of: Callable[[str], Sequence[int] | None]) -> list[Segments]:
    """How the tensor of `key` (of `shape`) of each model B… (index 1…) is scaled before the merge: segments
    of its flattened elements and their factors. `norm_of` measures any key of any model (a K projection
    needs its query's norms), `shape_of` gives model A's shape of a key (None when A lacks it)."""
    none: list[Segments] = [()] * (n_models - 1)
    count = math.prod(shape)
    if mode is None:
        return none
    if mode == "layer":
        return [((0, count, _ratio(norm_of, key, i, count), False),) for i in range(1, n_models)]
    separate = _query_of(key)
    if separate is not None:
        query_key, role = separate
        query_shape = shape_of(query_key)
        if query_shape is None:
            return none
        ratios = [_ratio(norm_of, query_key, i, math.prod(query_shape)) for i in range(1, n_models)]
        if any(r is None for r in ratios):
            return none
        return [((0, count, r, role == "k"),) for r in ratios]
    weight_key = _fused_weight_key(key)
    if weight_key is None:
        return none
    weight_shape = shape_of(weight_key)
    if weight_shape is None or len(weight_shape) != 2:
        return none
    h = _hidden(weight_shape)
    ratios = [_ratio(norm_of, weight_key, i, h * int(weight_shape[1])) for i in range(1, n_models)]
    if any(r is None for r in ratios):
        return none
    row = count // int(shape[0])  # elements per row of this key (the weight's width, or 1 for a bias)
    return [((0, h * row, r, False), (h * row, 2 * h * row, r, True)) for r in ratios]


def scale_chunk(chunk: torch.Tensor, start: int, segments: Segments) -> torch.Tensor:
    """Flat elements [start, start + len) of a tensor with its segments' factors applied (in place)."""
    stop = start + chunk.numel()
    for a, b, factor, divide in segments:
        i, j = max(a, start), min(b, stop)
        if i < j:
            part = chunk[i - start:j - start]
            part.div_(factor) if divide else part.mul_(factor)
    return chunk


def normalized(key: str, tensors: list[torch.Tensor], mode: str | None,
               read: Callable[[str], list[torch.Tensor] | None]) -> list[torch.Tensor]:
    """`tensors` (model A first) with models B… scaled to A's norms, whole tensors (the chunked merge applies
    the same `scalings` chunk by chunk); `read(key)` gives another key's tensors of every model (or None)."""
    cache = {key: tensors}

    def tensors_of(k: str) -> list[torch.Tensor] | None:
        if k not in cache:
            cache[k] = read(k)
        return cache[k]

    def norm_of(k: str, i: int, count: int) -> float | None:
        found = tensors_of(k)
        return None if found is None else flat_norm(lambda s, e: found[i].reshape(-1)[s:e], count)

    def shape_of(k: str):
        found = tensors_of(k)
        return None if found is None else tuple(found[0].shape)

    plans = scalings(key, tuple(tensors[0].shape), len(tensors), mode, norm_of, shape_of)
    return [tensors[0], *(scale_chunk(t.clone().reshape(-1), 0, seg).reshape(t.shape) if seg else t
                          for t, seg in zip(tensors[1:], plans))]
