"""LoRA generators with real key names and shapes, for benchmarks and tests (no download, no model needed).

Module lists come from `reference/shapes/` (read at call time, so a missing reference folder fails with
a clear message instead of at import):
- SDXL: UNet in kohya's SGM naming (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`) from
  `sdxl_unet_kohya_sgm.tsv` — "attention" = the 722 Linears inside Transformer2DModel blocks that a default
  kohya LoRA targets, "all" adds the ResNet Linears and 3×3 convs of a LoCon — plus CLIP-L (`lora_te1_`, 72)
  and CLIP-G (`lora_te2_`, 192, `text_projection` is not a kohya target) from `clip_l.tsv` / `clip_g.tsv`.
- Flux.1: kohya names (`lora_unet_double_blocks_0_img_attn_qkv`) and full BFL shapes from `flux1_bfl_kohya.tsv`.

`make_lora` fills the modules with random factors in kohya layout (`lora_down.weight` [r, in(, kh, kw)],
`lora_up.weight` [out, r(, 1, 1)], `alpha`), with a decaying scale per rank direction so the product has a
trained-LoRA-like spectrum rather than a flat one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_DIR = os.path.join(ROOT, "..", "shared", "reference", "shapes")


@dataclass(frozen=True)
class LoraModule:
    """One kohya-named LoRA target: `name` without suffix, `shape` of the base weight (out, in[, kh, kw])."""

    name: str
    shape: tuple[int, ...]

    @property
    def is_conv3(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] != (1, 1)


def _rows(filename: str) -> list[list[str]]:
    path = os.path.join(SHAPES_DIR, filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the reference shape tables are needed to build fixtures")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def sdxl_modules(unet: str = "attention", te1: bool = True, te2: bool = True,
                 blocks: Iterable[str] | None = None) -> list[LoraModule]:
    """SDXL LoRA targets in kohya naming. `unet`: "attention" (default kohya LoRA), "all" (LoCon), "none".

    `blocks` keeps only UNet modules whose kohya name contains one of the given fragments
    (e.g. "input_blocks_4_", "middle_block_"): a smaller set with the real shape ratios.
    """
    if unet not in ("attention", "all", "none"):
        raise ValueError(f"unet must be attention, all or none, not {unet!r}")
    out: list[LoraModule] = []
    if unet != "none":
        fragments = tuple(blocks) if blocks else None
        for kohya, diffusers, _kind, shape, _bias in _rows("sdxl_unet_kohya_sgm.tsv")[1:]:
            if unet == "attention" and ".attentions." not in f".{diffusers}":
                continue
            if fragments and not any(f in kohya for f in fragments):
                continue
            out.append(LoraModule(kohya, _shape(shape)))
    if te1:
        out += _clip_modules("clip_l.tsv", "lora_te1_")
    if te2:
        out += _clip_modules("clip_g.tsv", "lora_te2_")
    return out


def _clip_modules(filename: str, prefix: str) -> list[LoraModule]:
    modules = []
    for path, _kind, shape, _bias in _rows(filename):
        if path == "text_projection":
            continue  # not a kohya target
        # clip_l.tsv omits HF's leading `text_model.`; kohya's names always carry it.
        hf = path if path.startswith("text_model.") else "text_model." + path
        modules.append(LoraModule(prefix + hf.replace(".", "_"), _shape(shape)))
    return modules


def flux_modules(double_blocks: Iterable[int] = range(19), single_blocks: Iterable[int] = range(38),
                 default_only: bool = True) -> list[LoraModule]:
    """Flux.1 LoRA targets in kohya naming with full BFL shapes, for the chosen double/single blocks.

    `default_only` keeps what sd-scripts' lora_flux trains by default (the block Linears); False adds the
    embedders and final layer.
    """
    doubles = {f"double_blocks.{i}." for i in double_blocks}
    singles = {f"single_blocks.{i}." for i in single_blocks}
    out = []
    for bfl, kohya, shape, default in _rows("flux1_bfl_kohya.tsv")[1:]:
        in_blocks = any(bfl.startswith(p) for p in doubles | singles)
        is_block = bfl.startswith(("double_blocks.", "single_blocks."))
        if in_blocks or (not is_block and not default_only and default != "True"):
            out.append(LoraModule(kohya, _shape(shape)))
    return out


def make_lora(modules: Iterable[LoraModule], rank: int, *, alpha: float | None = None, conv_rank: int | None = None,
              seed: int = 0, dtype: torch.dtype = torch.float16, decay: float = 0.5,
              ranks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Random kohya LoRA tensors for `modules` (state dict ready to save).

    Rank `rank` for Linear/1×1 modules, `conv_rank` (default `rank`) for k×k convs, or per module from
    `ranks`. Direction j of the rank gets weight (j+1)^-decay, so singular values decay like a trained
    LoRA's. `alpha` default = rank (scale 1); a float gives alpha/rank scale per module.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        r = (ranks or {}).get(module.name) or (conv_rank or rank if module.is_conv3 else rank)
        out_dim, in_dim = module.shape[0], module.shape[1]
        kernel = module.shape[2:] if len(module.shape) == 4 else ()
        r = min(r, out_dim, in_dim * math.prod(kernel or (1,)))
        fan_in = in_dim * math.prod(kernel or (1,))
        weights = torch.arange(1, r + 1, dtype=torch.float32).pow(-decay)
        down = torch.randn(r, fan_in, generator=gen) / math.sqrt(fan_in)
        up = torch.randn(out_dim, r, generator=gen) * 0.05 * weights
        if kernel:
            down = down.reshape(r, in_dim, *kernel)
            up = up.reshape(out_dim, r, 1, 1)
        tensors[f"{module.name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{module.name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{module.name}.alpha"] = torch.tensor(float(r if alpha is None else alpha)).to(dtype)
    return tensors


def kohya_metadata(family: str, rank: int, alpha: float | None = None) -> dict[str, str]:
    """The few `ss_*` keys a kohya trainer writes that detection and tools read."""
    meta = {"ss_network_module": "networks.lora_flux" if family == "flux1" else "networks.lora",
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha if alpha is not None else rank)}
    if family == "sdxl":
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    elif family == "flux1":
        meta["ss_base_model_version"] = "flux1"
    return meta


def write_lora(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save a fixture (overwriting: fixtures live in temporary folders)."""
    from library.safetensors_io import save_tensors

    save_tensors(path, tensors, metadata=metadata, overwrite=True)
    return path


def dense_delta(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(alpha/r)·up @ down of one kohya module, flattened to [out, in·kh·kw] — the independent oracle."""
    down = tensors[f"{name}.lora_down.weight"].to(dtype)
    up = tensors[f"{name}.lora_up.weight"].to(dtype)
    r = down.shape[0]
    alpha = tensors.get(f"{name}.alpha")
    scale = float(alpha) / r if alpha is not None else 1.0
    return scale * up.reshape(up.shape[0], r) @ down.reshape(r, -1)
