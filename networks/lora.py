"""LoRA / LoCon: ΔW = (α/r)·up @ down, for Linear, 1×1 and k×k convs, with optional Tucker `lora_mid`."""

from __future__ import annotations

import torch

from networks.base import Adapter, DoraMagnitude, reshape_to, scale_for


class LoRAAdapter(Adapter):
    kind = "lora"

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None, mid: torch.Tensor | None = None,
                 *, name: str = "", dora: DoraMagnitude | None = None, bias_delta: torch.Tensor | None = None):
        super().__init__(name, alpha, dora, bias_delta)
        self.down = down
        self.up = up
        self.mid = mid

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the weight this adapter targets, as far as the factors tell it."""
        out = int(self.up.shape[0])
        if self.mid is not None:
            return (out, int(self.down.shape[1]), *self.mid.shape[2:])
        if self.down.dim() == 4:
            return (out, *self.down.shape[1:])
        return (out, int(self.down.shape[1]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in·kh·kw]) in float32 with the scale folded into up: up @ down = ΔW (flattened)."""
        up = self.up.float().reshape(self.up.shape[0], -1) * self.scale
        if self.mid is None:
            down = self.down.float().reshape(self.rank, -1)
        else:
            # Tucker: fold the core into the down side so the pair is a plain rank-r factorisation.
            core = torch.einsum("mnhw,ni->mihw", self.mid.float(), self.down.float().reshape(self.rank, -1))
            down = core.reshape(core.shape[0], -1)
        return up, down

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        up, down = self.factors()
        return reshape_to(up @ down, shape or self.out_shape, self.name)
