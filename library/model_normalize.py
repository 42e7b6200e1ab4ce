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


def _ratio(target: torch.Tensor, tensor: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(tensor.double()))
    return float(torch.linalg.vector_norm(target.double())) / norm if norm > 0 else 1.0


def _hidden(weight_shape: Sequence[int]) -> int:
    """H of a fused q,k,v(,mlp) weight: its input width (qkv: 3H × H; Flux linear1: 3H + mlp × H)."""
    return int(weight_shape[1])


def normalized(key: str, tensors: list[torch.Tensor], mode: str | None,
               read: Callable[[str], list[torch.Tensor] | None]) -> list[torch.Tensor]:
    """`tensors` (model A first) with models B… scaled to A's norms; `read(key)` gives another key's tensors
    of every model (or None when one lacks it): a K projection needs its query's norms."""
    if mode is None:
        return tensors
    a, others = tensors[0], tensors[1:]
    if mode == "layer":
        return [a, *(t * _ratio(a, t) for t in others)]
    separate = _query_of(key)
    if separate is not None:
        query_key, role = separate
        queries = tensors if query_key == key else read(query_key)
        if queries is None:
            return tensors
        scales = [_ratio(queries[0], q) for q in queries[1:]]
        return [a, *(t * s if role == "q" else t / s for t, s in zip(others, scales))]
    weight_key = _fused_weight_key(key)
    if weight_key is None:
        return tensors
    weights = tensors if weight_key == key else read(weight_key)
    if weights is None or weights[0].dim() != 2:
        return tensors
    h = _hidden(weights[0].shape)
    scales = [_ratio(weights[0][:h], w[:h]) for w in weights[1:]]
    out = [a]
    for t, s in zip(others, scales):
        t = t.clone()
        t[:h] *= s
        t[h:2 * h] /= s
        out.append(t)
    return out
