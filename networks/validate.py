"""Checks every module's tensors before anything uses them, the same way in every script.

A module that passes has floating-point factors, ranks of at least 1 that agree between its factors,
and an alpha that is one finite number. Whether the delta fits its target weight is the reader's
matching (`library.formats.match.fits`); here only the module's own consistency is checked, so the
rules hold for modules built in code too (extraction, merges) and not only for files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from library.errors import LoraToolsError


def check_module(tensors: Mapping[str, torch.Tensor], name: str = "", *, file: str | None = None,
                 keys: Mapping[str, str] | None = None) -> None:
    """Raise a LoraToolsError naming `file` and the offending key unless the module is consistent.

    `tensors` are keyed by kohya/LyCORIS suffix; `keys` maps a suffix to its key in the file (default:
    `name.suffix`), so the message names the key the user can find with a header viewer.
    """
    def fail(suffix: str, message: str) -> None:
        key = (keys or {}).get(suffix) or (f"{name}.{suffix}" if name else suffix)
        raise LoraToolsError(message, file=file, key=key)

    shapes = {}
    for suffix, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            fail(suffix, f"is a {type(tensor).__name__}, not a tensor")
        if suffix == "alpha":
            _check_alpha(tensor, lambda m: fail("alpha", m))
            continue
        if suffix in ROW_WINDOW_SUFFIXES:
            _check_row_window(suffix, tensor, tensors, fail)
            continue
        if not tensor.dtype.is_floating_point:
            fail(suffix, f"is {str(tensor.dtype).removeprefix('torch.')}; adapter tensors must be floating point")
        if tensor.dim() == 0:
            fail(suffix, "is a scalar; adapter tensors have at least one dimension")
        if 0 in tensor.shape:
            what = "a rank-0 module" if suffix in _RANKED else "an empty tensor"
            fail(suffix, f"has shape {tuple(tensor.shape)}: {what}")
        shapes[suffix] = tuple(tensor.shape)
    if "lora_down.weight" in shapes or "lora_up.weight" in shapes:
        _check_lora(shapes, fail)
    if any(s.startswith("hada_") for s in shapes):
        _check_loha(shapes, fail)
    if any(s.startswith("lokr_") for s in shapes):
        _check_lokr(shapes, fail)


# Suffixes whose first or second dimension is a rank: an empty one there is a rank-0 module.
_RANKED = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
           "hada_t1", "hada_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


# ComfyUI's `.row_offset` (one integer) and our `row_window` ([offset, rows], what the reader makes of it).
ROW_WINDOW_SUFFIXES = {"row_offset": 1, "row_window": 2}


def _check_row_window(suffix: str, value: torch.Tensor, tensors, fail) -> None:
    if not any(k.startswith("lokr_") for k in tensors):
        fail(suffix, "belongs to a LoKr module (ComfyUI's split of a fused qkv); this module is no LoKr")
    if value.numel() != ROW_WINDOW_SUFFIXES[suffix] or value.is_complex() or value.dtype == torch.bool:
        fail(suffix, f"has shape {tuple(value.shape)}; it holds {ROW_WINDOW_SUFFIXES[suffix]} integer(s)")
    numbers = value.reshape(-1).double()
    if not bool(torch.isfinite(numbers).all()) or bool((numbers != numbers.round()).any()) or bool((numbers < 0).any()):
        fail(suffix, f"is {numbers.tolist()}; a row offset is a non-negative integer")


def _check_alpha(alpha: torch.Tensor, fail) -> None:
    if alpha.numel() != 1:
        fail(f"has {alpha.numel()} elements (shape {tuple(alpha.shape)}); alpha is one number")
    if alpha.dtype == torch.bool or alpha.is_complex():
        fail(f"is {str(alpha.dtype).removeprefix('torch.')}; alpha is a real number")
    if not math.isfinite(float(alpha.detach().reshape(()).double())):
        fail(f"is {float(alpha.detach().reshape(()).double())}; alpha must be finite")


def _need(shapes, suffixes, fail, what: str) -> None:
    missing = [s for s in suffixes if s not in shapes]
    if missing:
        fail(missing[0], f"is missing: a {what} module needs {', '.join(suffixes)}")


def _check_lora(s, fail) -> None:
    _need(s, ("lora_down.weight", "lora_up.weight"), fail, "LoRA")
    down, up = s["lora_down.weight"], s["lora_up.weight"]
    rank = down[0]
    if len(down) < 2:
        fail("lora_down.weight", f"has shape {down}; expected [rank, in] or [rank, in, *kernel]")
    if len(up) < 2 or any(d != 1 for d in up[2:]):
        fail("lora_up.weight", f"has shape {up}; expected [out, rank] or [out, rank, 1, …]")
    if up[1] != rank:
        fail("lora_up.weight", f"has rank {up[1]} (shape {up}) but lora_down.weight has rank {rank} (shape {down})")
    mid = s.get("lora_mid.weight")
    if mid is not None:
        if len(mid) != len(down) or len(mid) < 3 or any(d != 1 for d in down[2:]):
            fail("lora_mid.weight", f"has shape {mid} with lora_down {down}; Tucker LoCon needs mid [rank, rank, *kernel] "
                                    "and down [rank, in, 1, …]")
        if mid[0] != up[1] or mid[1] != rank:
            fail("lora_mid.weight", f"has shape {mid}, which does not match rank {rank}")


def _check_loha(s, fail) -> None:
    _need(s, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), fail, "LoHa")
    tucker = [t for t in ("hada_t1", "hada_t2") if t in s]
    if len(tucker) == 1:
        fail(tucker[0], "is given without its pair: a Tucker LoHa needs both hada_t1 and hada_t2")
    products = []
    for i in ("1", "2"):
        a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
        if len(a) != 2 or len(b) != 2:
            fail(f"hada_w{i}_a" if len(a) != 2 else f"hada_w{i}_b", f"must be 2-D (shapes {a} and {b})")
        if tucker:
            t = s[f"hada_t{i}"]
            # LyCORIS' Tucker layout: w_a [r, out], w_b [r, in], core [r, r, kh, kw]
            if len(t) < 2 or t[0] != a[0] or t[1] != b[0]:
                fail(f"hada_t{i}", f"has shape {t}, which does not match hada_w{i}_a {a} and hada_w{i}_b {b}")
            products.append((a[1], b[1], *t[2:]))
        else:
            if a[1] != b[0]:
                fail(f"hada_w{i}_a", f"has rank {a[1]} (shape {a}) but hada_w{i}_b has rank {b[0]} (shape {b})")
            products.append((a[0], b[1]))
    if products[0] != products[1]:
        fail("hada_w2_a", f"gives a {products[1]} factor where hada_w1 gives {products[0]}; the Hadamard product "
                          "needs equal shapes")


def _check_lokr(s, fail) -> None:
    for w in ("1", "2"):
        full, a, b = f"lokr_w{w}", f"lokr_w{w}_a", f"lokr_w{w}_b"
        if full in s and (a in s or b in s):
            fail(full, f"is given together with {a}/{b}; a LoKr factor is either full or decomposed")
        if full not in s:
            _need(s, (a, b), fail, f"LoKr (without {full})")
            sa, sb = s[a], s[b]
            if len(sa) != 2 or len(sb) < 2:
                fail(a, f"has shape {sa} with {b} {sb}; expected [m, rank] and [rank, n]")
            if f"lokr_t{w}" in s:
                t = s[f"lokr_t{w}"]
                if len(t) < 2 or t[0] != sa[0] or t[1] != sb[0]:
                    fail(f"lokr_t{w}", f"has shape {t}, which does not match {a} {sa} and {b} {sb}")
            elif sa[1] != sb[0]:
                fail(a, f"has rank {sa[1]} (shape {sa}) but {b} has rank {sb[0]} (shape {sb})")
