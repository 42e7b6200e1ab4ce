"""Full difference: the delta itself is stored (`diff`, LyCORIS `w_norm`), with an optional bias delta."""

from __future__ import annotations

import torch

from networks.base import Adapter, reshape_to


class FullDiffAdapter(Adapter):
    kind = "full"

    def __init__(self, diff: torch.Tensor | None, *, name: str = "", bias_delta: torch.Tensor | None = None):
        super().__init__(name, None, None, bias_delta)
        self.diff = diff

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if self.diff is None:
            raise ValueError(f"{self.name}: bias-only adapter has no weight delta")
        return reshape_to(self.diff.float(), shape, self.name)

    def delta_with_base(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        if self.diff is None:
            return torch.zeros_like(weight, dtype=torch.float32)
        return super().delta_with_base(weight, strength)
