"""Exact row-wise splitting and fusing of adapter tensors (formats.md §3.3, §3.4).

A fused weight (Flux qkv, linear1, OpenCLIP in_proj) is written by some formats as one module and by
others as one module per row range. Splitting keeps the shared down factor and slices the up factor
(or, when the up factor is block diagonal, slices both and keeps the rank small). Fusing keeps one
down when all downs are identical, else stacks them with a block-diagonal up, alpha adjusted so the
scale is unchanged. LoKr ranges that are not multiples of its block size, and mixes of adapter types,
become full `diff` tensors (exact, larger). Every function returns new dicts and never edits its input.
"""

from __future__ import annotations

import torch

from library.errors import LoraToolsError
from networks import WINDOW_SUFFIX, adapter_from_tensors
from networks.base import alpha_value, scale_for

ROW_BIAS = ("lora_up.bias", "diff_b", "b_norm")
Range = tuple[int, int]


def kind_of(tensors: dict[str, torch.Tensor]) -> str:
    if "lora_up.weight" in tensors:
        return "lora"
    if "hada_w1_a" in tensors:
        return "loha"
    if any(k.startswith("lokr_") for k in tensors):
        return "lokr"
    return "full"


def rank_of(tensors: dict[str, torch.Tensor]) -> int | None:
    kind = kind_of(tensors)
    if kind == "lora":
        return int(tensors["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    if kind == "lokr":
        return adapter_from_tensors(tensors).rank
    return None


def scale_of(tensors: dict[str, torch.Tensor]) -> float:
    rank = rank_of(tensors)
    if rank is None:
        return 1.0
    return adapter_from_tensors(tensors).scale


def _alpha_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _up_side(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Tensors whose dim 0 runs over output rows and dim 1 over rank."""
    kind = kind_of(tensors)
    if kind == "lora":
        return ["lora_up.weight"]
    if kind == "loha":
        return ["hada_w1_a", "hada_w2_a"]
    return []


def _down_side(tensors: dict[str, torch.Tensor]) -> list[str]:
    kind = kind_of(tensors)
    return ["lora_down.weight"] if kind == "lora" else ["hada_w1_b", "hada_w2_b"] if kind == "loha" else []


def _tucker(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k in tensors for k in ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2"))


def materialize(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], name: str = "") -> dict[str, torch.Tensor]:
    """The same change as a full `diff` (scale applied), keeping bias and DoRA tensors."""
    adapter = adapter_from_tensors(tensors, name)
    out = {"diff": adapter.delta(tuple(shape))}
    for key in (*ROW_BIAS, "dora_scale"):
        if key in tensors:
            out["diff_b" if key in ROW_BIAS else key] = tensors[key]
    return out


def _slice_rows(tensors: dict[str, torch.Tensor], start: int, stop: int, name: str) -> dict[str, torch.Tensor]:
    """Row-slice the row-indexed tensors (biases, output-axis DoRA); others are shared."""
    out = {}
    for key, value in tensors.items():
        if key in ROW_BIAS or key == "diff":
            out[key] = value[start:stop]
        elif key == "dora_scale":
            if value.shape[0] == 1 and value.dim() >= 2:
                raise LoraToolsError("cannot split a DoRA module normalised per input column across a fused weight",
                                     key=name)
            out[key] = value[start:stop]
        else:
            out[key] = value
    return out


def _support(tensors: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Boolean mask over rank columns that are non-zero in rows [start, stop) of the up-side factors."""
    mask = None
    for key in _up_side(tensors):
        block = tensors[key][start:stop].reshape(stop - start, tensors[key].shape[1], -1)
        cols = (block != 0).any(dim=2).any(dim=0)
        mask = cols if mask is None else mask | cols
    return mask


def _is_zero(tensors: dict[str, torch.Tensor], start: int, stop: int) -> bool:
    if any(bool((tensors[k][start:stop] != 0).any()) for k in _up_side(tensors)):
        return False
    return not any(k in tensors and bool((tensors[k][start:stop] != 0).any()) for k in ROW_BIAS)


def split(tensors: dict[str, torch.Tensor], parts: list[Range], shape: tuple[int, ...], name: str = "") \
        -> list[dict[str, torch.Tensor] | None]:
    """Split a module on rows [0, shape[0]) into modules on `parts` (relative row ranges).

    A part whose rows are all zero is returned as None (dropping it is lossless).
    """
    kind = kind_of(tensors)
    if kind == "full":
        return [_slice_rows(tensors, s, e, name) for s, e in parts]
    if kind == "lokr" or (kind == "loha" and _tucker(tensors)):
        if kind == "lokr":
            out = _split_lokr(tensors, parts)
            if out is not None:
                return out
        whole = materialize(tensors, shape, name)
        return [_slice_rows(whole, s, e, name) for s, e in parts]
    alive = [not _is_zero(tensors, s, e) for s, e in parts]
    if not any(alive):
        alive = [True] * len(parts)  # an all-zero module (fresh init) still keeps its keys
    supports = [_support(tensors, s, e) for s, e in parts]
    live = [m for m, a in zip(supports, alive, strict=True) if a]
    total = torch.stack(live).sum(dim=0) if live else None
    sparse = (not _tucker(tensors) and total is not None and bool((total <= 1).all())
              and all(bool(m.any()) for m in live) and len(live) > 1)
    rank = rank_of(tensors)
    scale = scale_of(tensors)
    out: list[dict[str, torch.Tensor] | None] = []
    for (s, e), keep, mask in zip(parts, alive, supports, strict=True):
        if not keep:
            out.append(None)
            continue
        piece = _slice_rows(tensors, s, e, name)
        for key in _up_side(tensors):
            piece[key] = tensors[key][s:e]
        if sparse:
            cols = mask.nonzero().flatten()
            for key in _up_side(tensors):
                piece[key] = piece[key][:, cols]
            for key in _down_side(tensors):
                piece[key] = tensors[key][cols]
            if len(cols) != rank and "alpha" in tensors:
                piece["alpha"] = _alpha_tensor(scale * len(cols))
        out.append(piece)
    return out


def _split_lokr(tensors: dict[str, torch.Tensor], parts: list[Range]) -> list[dict[str, torch.Tensor]] | None:
    """Rows [s, e) of kron(w1, w2) are kron(w1[s/c:e/c], w2) when c = rows of w2 divides s and e. A LoKr that
    already covers a row window of its product (ComfyUI's row_offset) splits into narrower windows of it."""
    if WINDOW_SUFFIX in tensors:
        offset = _window_start(tensors)
        return [{**_slice_rows(tensors, s, e, ""), WINDOW_SUFFIX: torch.tensor([offset + s, e - s])} for s, e in parts]
    w2 = tensors.get("lokr_w2", tensors.get("lokr_w2_a"))
    c = int(w2.shape[1] if "lokr_t2" in tensors else w2.shape[0])
    if any(s % c or e % c for s, e in parts):
        return None
    out = []
    for s, e in parts:
        piece = _slice_rows(tensors, s, e, "")
        key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        piece[key] = tensors[key][s // c:e // c]
        out.append(piece)
    return out


def _window_start(tensors: dict[str, torch.Tensor]) -> int:
    """Where a windowed LoKr's rows start in its product (0 when the product is the window: ComfyUI ignores the
    offset of a product of the weight's own size)."""
    from library.formats.match import io_dims

    offset, rows = (int(x) for x in tensors[WINDOW_SUFFIX].tolist())
    product = io_dims({k: tuple(v.shape) for k, v in tensors.items() if k != WINDOW_SUFFIX})[0]
    return 0 if product == rows else offset


def _fuse_windows(pieces, rows: int) -> dict[str, torch.Tensor] | None:
    """Windows of one LoKr product that tile it in order (ComfyUI's q/k/v split of a fused qkv LoKr) fuse back
    into that LoKr, exactly; None for anything else."""
    first = pieces[0][1]
    shared = [k for k in first if k != WINDOW_SUFFIX and k not in ROW_BIAS and k != "dora_scale"]
    for (s, e), t in pieces:
        if WINDOW_SUFFIX not in t or set(t) != set(first) or _window_start(t) != s or \
                int(t[WINDOW_SUFFIX][1]) != e - s or any(not torch.equal(t[k], first[k]) for k in shared):
            return None
    from library.formats.match import io_dims

    if sum(e - s for (s, e), _ in pieces) != rows or io_dims({k: tuple(first[k].shape) for k in shared})[0] != rows:
        return None
    out = {k: first[k] for k in shared}
    out.update(_fuse_extras(pieces, rows, ""))
    return out


def fuse(pieces: list[tuple[Range, dict[str, torch.Tensor]]], rows: int, shape: tuple[int, ...], name: str = "") \
        -> dict[str, torch.Tensor]:
    """One module on rows [0, rows) from modules on sub-ranges; uncovered rows get a zero change.

    `shape` is the full (sliced) weight shape [rows, in, …], used when a piece must become a diff.
    """
    kinds = {kind_of(t) for _, t in pieces}
    if len(kinds) == 1 and kinds <= {"lora", "loha"} and not any(_tucker(t) for _, t in pieces):
        shared = _fuse_shared(pieces, rows)
        return shared if shared is not None else _fuse_block_diagonal(pieces, rows)
    if kinds == {"lokr"}:
        fused = _fuse_windows(pieces, rows) or _fuse_lokr(pieces, rows)
        if fused is not None:
            return fused
    full = [((s, e), materialize(t, (e - s, *shape[1:]), name) if kind_of(t) != "full" else t) for (s, e), t in pieces]
    return _fuse_full(full, rows, shape, name)


def _place(pieces, key: str, rows: int, cols: list[slice] | None = None, total_cols: int | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Stack each piece's `key` tensor into its row range (and column block when `cols` is given)."""
    present = [t[key] for _, t in pieces if key in t]
    if not present:
        return None
    first = present[0]
    shape = list(first.shape)
    shape[0] = rows
    if cols is not None:
        shape[1] = total_cols
    out = torch.zeros(shape, dtype=dtype or first.dtype)
    for i, ((s, e), t) in enumerate(pieces):
        if key in t:
            if cols is None:
                out[s:e] = t[key].to(out.dtype)
            else:
                out[s:e, cols[i]] = t[key].to(out.dtype)
    return out


def _fuse_extras(pieces, rows: int, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in ROW_BIAS:
        placed = _place(pieces, key, rows)
        if placed is not None:
            out[key] = placed
    if any("dora_scale" in t for _, t in pieces):
        covered = sum(e - s for (s, e), _ in pieces)
        if covered != rows or not all("dora_scale" in t for _, t in pieces):
            raise LoraToolsError("cannot fuse DoRA modules that do not cover the whole fused weight", key=name)
        if any(t["dora_scale"].shape[0] == 1 and t["dora_scale"].dim() >= 2 for _, t in pieces):
            raise LoraToolsError("cannot fuse DoRA modules normalised per input column", key=name)
        out["dora_scale"] = _place(pieces, "dora_scale", rows)
    return out


def _fuse_shared(pieces, rows: int) -> dict[str, torch.Tensor] | None:
    """Rank-r fusion when every piece has the same down side and the same scale (inverse of a shared split)."""
    first = pieces[0][1]
    for _, t in pieces[1:]:
        for key in _down_side(first):
            if t[key].shape != first[key].shape or t[key].dtype != first[key].dtype or not torch.equal(t[key], first[key]):
                return None
        if scale_of(t) != scale_of(first) or ("alpha" in t) != ("alpha" in first):
            return None
    out = {key: first[key] for key in _down_side(first)}
    for key in _up_side(first):
        out[key] = _place(pieces, key, rows)
    if "alpha" in first:
        out["alpha"] = first["alpha"]
    out.update(_fuse_extras(pieces, rows, ""))
    return out


def _fuse_block_diagonal(pieces, rows: int) -> dict[str, torch.Tensor]:
    """Stack downs, place each up in its own row and column block; alpha keeps the common scale."""
    ranks = [rank_of(t) for _, t in pieces]
    scales = [scale_of(t) for _, t in pieces]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    cols = [slice(a, a + r) for a, r in zip(starts, ranks, strict=True)]
    total = sum(ranks)
    first = pieces[0][1]
    same_scale = all(s == scales[0] for s in scales)
    if not same_scale:
        # Bake each piece's own scale into its up side; the fused module then has scale 1 (alpha = rank).
        baked = []
        for (rng, t), s in zip(pieces, scales, strict=True):
            t = dict(t)
            key = _up_side(t)[0]
            t[key] = (t[key].float() * s).to(t[key].dtype)
            baked.append((rng, t))
        pieces = baked
    out = {}
    for key in _down_side(first):
        out[key] = torch.cat([t[key].to(first[key].dtype) for _, t in pieces], dim=0)
    for key in _up_side(first):
        out[key] = _place(pieces, key, rows, cols, total)
    if same_scale and (scales[0] != 1.0 or any("alpha" in t for _, t in pieces)):
        out["alpha"] = _alpha_tensor(scales[0] * total)
    elif not same_scale:
        out["alpha"] = _alpha_tensor(float(total))
    out.update(_fuse_extras(pieces, rows, ""))
    return out


def _fuse_lokr(pieces, rows: int) -> dict[str, torch.Tensor] | None:
    """LoKr pieces sharing w2 and scale and tiling the rows in multiples of its block fuse by stacking w1."""
    first = pieces[0][1]
    if "lokr_w1" not in first or "lokr_w1_a" in first or any(WINDOW_SUFFIX in t for _, t in pieces):
        return None
    covered = sum(e - s for (s, e), _ in pieces)
    for _, t in pieces:
        if set(t) != set(first) or scale_of(t) != scale_of(first) or "lokr_w1" not in t:
            return None
        for key in t:
            if (key.startswith("lokr_w2") or key == "lokr_t2") and (
                    t[key].shape != first[key].shape or not torch.equal(t[key], first[key])):
                return None
    if covered != rows:
        return None
    ordered = sorted(pieces, key=lambda p: p[0][0])
    out = {k: v for k, v in first.items() if k.startswith("lokr_w2") or k in ("lokr_t2", "alpha")}
    out["lokr_w1"] = torch.cat([t["lokr_w1"] for _, t in ordered], dim=0)
    out.update(_fuse_extras(pieces, rows, ""))
    return out


def _fuse_full(pieces, rows: int, shape: tuple[int, ...], name: str) -> dict[str, torch.Tensor]:
    diff = torch.zeros((rows, *shape[1:]), dtype=torch.float32)
    dtype = None
    for (s, e), t in pieces:
        if "diff" in t:
            dtype = dtype or t["diff"].dtype
            diff[s:e] = t["diff"].float().reshape(e - s, *shape[1:])
    out = {"diff": diff.to(dtype or torch.float32)}
    out.update(_fuse_extras(pieces, rows, name))
    return out


def swap_halves(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], name: str = "") -> dict[str, torch.Tensor]:
    """Swap the two output halves (BFL shift|scale ↔ diffusers scale|shift): only output-side tensors move.

    The row count comes from the tensors themselves when they tell it (`shape` is the table's).
    """
    for key in (*_up_side(tensors), "diff", *ROW_BIAS):
        if key in tensors and not (key == "hada_w1_a" and "hada_t1" in tensors):
            shape = (int(tensors[key].shape[0]), *shape[1:])
            break
    rows = shape[0]
    half = rows // 2
    kind = kind_of(tensors)
    if kind == "lokr" or (kind == "loha" and _tucker(tensors)):
        lokr = _split_lokr(tensors, [(0, half), (half, rows)]) if kind == "lokr" else None
        if lokr is not None:
            return fuse([((0, half), lokr[1]), ((half, rows), lokr[0])], rows, shape, name)
        tensors = materialize(tensors, shape, name)
    out = dict(tensors)
    for key in (*_up_side(tensors), *ROW_BIAS, "diff", "dora_scale"):
        if key in tensors:
            t = tensors[key]
            if key == "dora_scale" and t.shape[0] != rows:
                raise LoraToolsError("cannot reorder the rows of a DoRA module normalised per input column", key=name)
            out[key] = torch.cat([t[half:], t[:half]], dim=0)
    return out


def stored_alpha(tensors: dict[str, torch.Tensor]) -> float | None:
    return alpha_value(tensors.get("alpha"))


__all__ = ["split", "fuse", "swap_halves", "materialize", "kind_of", "rank_of", "scale_of", "scale_for", "stored_alpha"]
