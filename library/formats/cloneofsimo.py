"""cloneofsimo/lora (`lora_diffusion`) safetensors files, read as the kohya SD1.x/SD2.x LoRA they are.

`lora_diffusion.save_safeloras` writes, per model ("unet", "text_encoder"), tensors `<model>:<i>:up` [out, r]
and `<model>:<i>:down` [r, in], metadata `<model>` = JSON list of the module classes it injected into and
`<model>:<i>:rank`. There are no module names: `i` counts the injected Linear layers in the order
`_find_modules` meets them, i.e. `model.modules()` (registration order, depth first) for each ancestor of a
target class, then that ancestor's own Linear children in order. There is no alpha: the layer adds
`up(down(x)) · scale` with the user's runtime scale, so the stored delta is up@down (alpha = rank).

This module rebuilds that order for diffusers' SD1.x/SD2.x UNet2DConditionModel (down_blocks, then up_blocks,
then mid_block, as the model registers them) and transformers' CLIPAttention (k_proj, v_proj, q_proj,
out_proj), renames the tensors to kohya names, and lets detection check every shape against the family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from library.errors import LoraToolsError

KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
# lora_diffusion's defaults: UNet attentions (and GEGLU's proj in later versions), CLIP attention.
UNET_ATTENTION = ("CrossAttention", "Attention")


def is_cloneofsimo(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(KEY.match(k) or k.startswith("<") for k in keys) and any(KEY.match(k) for k in keys)


def _transformer_blocks() -> list[str]:
    """The 16 SD1.x/SD2.x transformer blocks in UNet2DConditionModel's module order (mid_block registers last)."""
    blocks = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    blocks += [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
    blocks.append("mid_block.attentions.0")
    return [f"{b}.transformer_blocks.0" for b in blocks]


def unet_order(with_geglu: bool) -> list[str]:
    names = []
    for block in _transformer_blocks():
        for attn in ("attn1", "attn2"):
            names += [f"{block}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        if with_geglu:
            names.append(f"{block}.ff.net.0.proj")
    return names


def text_encoder_order(layers: int) -> list[str]:
    return [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("k_proj", "v_proj", "q_proj",
                                                                                            "out_proj")]


def _kohya_name(model: str, path: str) -> str:
    return ("lora_unet_" if model == "unet" else "lora_te_") + path.replace(".", "_")


def as_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
             path: str | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors under kohya names (`.lora_up.weight`, `.lora_down.weight`, `.alpha` = rank)."""
    counts: dict[str, int] = {}
    for key in tensors:
        if m := KEY.match(key):
            counts[m[1]] = max(counts.get(m[1], 0), int(m[2]) + 1)
    # Anything else (textual-inversion embeddings `<token>` saved beside the LoRA) is passed on, so that the
    # reader lists it among the keys that map to no module.
    out: dict[str, torch.Tensor] = {k: t for k, t in tensors.items() if not KEY.match(k)}
    for model, count in counts.items():
        if model == "unet":
            targets = set(json.loads(metadata["unet"])) if "unet" in metadata else None
            geglu = "GEGLU" in targets if targets is not None else count == len(unet_order(True))
            order = unet_order(geglu)
        else:
            order = text_encoder_order(count // 4)
        if count != len(order):
            raise LoraToolsError(f"cloneofsimo LoRA with {count} {model} layers: an SD1.x/SD2.x {model} gives "
                                 f"{len(order)} with these target modules; its layer order cannot be rebuilt",
                                 file=path)
        for i, module in enumerate(order):
            up, down = tensors.get(f"{model}:{i}:up"), tensors.get(f"{model}:{i}:down")
            if up is None or down is None:
                raise LoraToolsError(f"{model}:{i}: needs both :up and :down", file=path, key=f"{model}:{i}")
            name = _kohya_name(model, module)
            out[f"{name}.lora_up.weight"], out[f"{name}.lora_down.weight"] = up, down
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # no alpha: the delta is up@down
    return out
