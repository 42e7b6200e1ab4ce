"""Adapter types: one small class each, built from a module's tensors by `adapter_from_tensors`."""

from __future__ import annotations

import torch

from library.errors import LoraToolsError
from networks.base import Adapter, DoraMagnitude, alpha_value
from networks.full import FullDiffAdapter
from networks.loha import LoHaAdapter
from networks.lokr import LoKrAdapter
from networks.lora import LoRAAdapter
from networks.validate import check_module

__all__ = ["Adapter", "DoraMagnitude", "LoRAAdapter", "LoHaAdapter", "LoKrAdapter", "FullDiffAdapter",
           "adapter_from_tensors", "check_module", "KNOWN_SUFFIXES"]

LORA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
LOHA_SUFFIXES = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_SUFFIXES = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL_SUFFIXES = {"diff", "w_norm"}
SHARED_SUFFIXES = {"alpha", "dora_scale", "diff_b", "b_norm", "lora_up.bias"}
# A LoKr on rows [offset, offset + rows) of its Kronecker product (ComfyUI's `.row_offset`; library.formats.read
# turns that key into this [offset, rows] window, the rows being the target's).
WINDOW_SUFFIX = "row_window"
KNOWN_SUFFIXES = LORA_SUFFIXES | LOHA_SUFFIXES | LOKR_SUFFIXES | FULL_SUFFIXES | SHARED_SUFFIXES | {WINDOW_SUFFIX}


def adapter_from_tensors(tensors: dict[str, torch.Tensor], name: str = "", *, dora_axis: str | None = None) -> Adapter:
    """Build the adapter of one module from its tensors keyed by kohya/LyCORIS suffix."""
    unknown = sorted(set(tensors) - KNOWN_SUFFIXES)
    if "row_offset" in unknown:
        raise LoraToolsError("a `.row_offset` key needs its target's rows: read the file with library.formats",
                             key=name)
    if unknown:
        raise LoraToolsError(f"unknown adapter tensors {unknown}", key=name)
    present = set(tensors)
    families = [label for label, suffixes in
                (("lora", LORA_SUFFIXES), ("loha", LOHA_SUFFIXES), ("lokr", LOKR_SUFFIXES), ("full", FULL_SUFFIXES))
                if present & suffixes]
    if len(families) > 1:
        raise LoraToolsError(f"module mixes adapter types {families}", key=name)
    check_module(tensors, name)
    alpha = alpha_value(tensors.get("alpha"))
    dora = DoraMagnitude.from_dora_scale(tensors["dora_scale"], name, dora_axis) if "dora_scale" in tensors else None
    bias = tensors.get("diff_b", tensors.get("b_norm", tensors.get("lora_up.bias")))
    kind = families[0] if families else "full"
    if kind == "lora":
        if not {"lora_down.weight", "lora_up.weight"} <= present:
            raise LoraToolsError("LoRA module needs both lora_down.weight and lora_up.weight", key=name)
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        return LoRAAdapter(down, up, alpha, mid, name=name, dora=dora, bias_delta=bias)
    if kind == "loha":
        needed = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not needed <= present:
            raise LoraToolsError(f"LoHa module lacks {sorted(needed - present)}", key=name)
        return LoHaAdapter(tensors["hada_w1_a"], tensors["hada_w1_b"], tensors["hada_w2_a"], tensors["hada_w2_b"], alpha,
                           tensors.get("hada_t1"), tensors.get("hada_t2"), name=name, dora=dora, bias_delta=bias)
    if kind == "lokr":
        window = tensors.get(WINDOW_SUFFIX)
        return LoKrAdapter({k: v for k, v in tensors.items() if k in LOKR_SUFFIXES}, alpha, name=name, dora=dora,
                           bias_delta=bias, window=None if window is None else tuple(int(x) for x in window.tolist()))
    diff = tensors.get("diff", tensors.get("w_norm"))
    if diff is None and bias is None:
        raise LoraToolsError("module has no adapter tensors", key=name)
    return FullDiffAdapter(diff, name=name, bias_delta=bias)

