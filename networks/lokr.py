"""LoKr: ΔW = scale·kron(w1, w2), each factor full or decomposed, w2 optionally with a Tucker core."""

from __future__ import annotations

import torch

from library.errors import LoraToolsError
from networks.base import Adapter, DoraMagnitude, reshape_to, scale_for
from networks.loha import tucker_factor


class LoKrAdapter(Adapter):
    kind = "lokr"

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float | None = None, *, name: str = "",
                 dora: DoraMagnitude | None = None, bias_delta: torch.Tensor | None = None):
        super().__init__(name, alpha, dora, bias_delta)
        self.tensors = tensors
        if "lokr_w1" not in tensors and not {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys():
            raise LoraToolsError("LoKr module has neither lokr_w1 nor lokr_w1_a/lokr_w1_b", key=name)
        if "lokr_w2" not in tensors and not {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys():
            raise LoraToolsError("LoKr module has neither lokr_w2 nor lokr_w2_a/lokr_w2_b", key=name)

    @property
    def rank(self) -> int | None:
        # The rank used for the scale: w2's decomposition wins over w1's (ComfyUI and LyCORIS agree).
        if "lokr_w2_b" in self.tensors:
            return int(self.tensors["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in self.tensors:
            return int(self.tensors["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        # Both factors full: LyCORIS trains with alpha = dim, so the scale is 1 whatever alpha says.
        rank = self.rank
        return 1.0 if rank is None else scale_for(self.alpha, rank)

    def _w1(self) -> torch.Tensor:
        t = self.tensors
        if "lokr_w1" in t:
            return t["lokr_w1"].float()
        return t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()

    def _w2(self) -> torch.Tensor:
        t = self.tensors
        if "lokr_w2" in t:
            return t["lokr_w2"].float()
        if "lokr_t2" in t:
            return tucker_factor(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        return t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        # A decomposed conv w2 is stored flattened [b, d·kh·kw]: the 2-D kron reshaped to the weight's shape equals
        # the 4-D kron when d·kh·kw splits, and also covers files whose w2 columns do not split by the kernel
        # (LyCORIS' smart_falcon LoKr: w1 [20, 60], w2 [16, 48] on a 320×320×3×3 conv), as ComfyUI computes it.
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        return reshape_to(torch.kron(w1, w2) * self.scale, shape, self.name)
