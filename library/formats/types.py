"""The canonical records every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Target:
    """A weight of the family's reference checkpoint, or a row slice of a fused one.

    `key` is the full tensor key in the reference single-file checkpoint (LDM/SGM names with their
    `model.diffusion_model.` / `cond_stage_model.` / `conditioner.embedders.N.` prefixes for SD1/SD2/SDXL;
    BFL names without prefix for Flux; `text_encoders.<clip_l|t5xxl>.transformer.` + HF names for the
    text encoders of transformer families, as in ComfyUI's single-file checkpoints). `rows` is the
    (start, stop) row slice of a fused weight, None for the whole weight. `shape` is that of the
    (sliced) weight.
    """

    key: str
    rows: tuple[int, int] | None
    component: str
    shape: tuple[int, ...]

    @property
    def full_rows(self) -> tuple[int, int]:
        return self.rows or (0, self.shape[0])

    def describe(self) -> str:
        return self.key + (f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else "")


@dataclass
class Module:
    """One adapter module on one target.

    `tensors` are keyed by kohya/LyCORIS suffix (`lora_down.weight`, `lora_up.weight`, `alpha` as a
    0-dim tensor, `hada_*`, `lokr_*`, `dora_scale`, `diff`, `diff_b`, `lora_up.bias`). DoRA magnitudes
    of any spelling become `dora_scale` shaped [out, 1(,1,1)] (axis "out") or [1, in(,1,1)] (axis "in"),
    with the axis in `dora_axis`. `source` is the module name as written in the file.
    """

    target: Target
    tensors: dict[str, torch.Tensor]
    source: str = ""
    dora_axis: str | None = None


@dataclass
class LoraFile:
    path: str
    family: str
    format: str
    modules: list[Module]
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # keys dropped with allow_unmatched
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. split_qkv alpha)
    variant: str | None = None  # a named checkpoint of the family the metadata says (FLUX.1 Kontext, Qwen-Image-Edit)
