"""LoHa: ΔW = (α/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b), or with Tucker cores for k×k convs."""

from __future__ import annotations

import torch

from networks.base import Adapter, DoraMagnitude, reshape_to, scale_for


def tucker_factor(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """M[p, q, …] = Σ_ij core[i, j, …]·w_b[j, q]·w_a[i, p] (LyCORIS' transposed Tucker layout)."""
    return torch.einsum("ij...,jq,ip->pq...", core.float(), w_b.float().reshape(w_b.shape[0], -1),
                        w_a.float().reshape(w_a.shape[0], -1))


class LoHaAdapter(Adapter):
    kind = "loha"

    def __init__(self, w1_a, w1_b, w2_a, w2_b, alpha: float | None = None, t1=None, t2=None, *, name: str = "",
                 dora: DoraMagnitude | None = None, bias_delta: torch.Tensor | None = None):
        super().__init__(name, alpha, dora, bias_delta)
        self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2 = w1_a, w1_b, w2_a, w2_b, t1, t2

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return scale_for(self.alpha, self.rank)

    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if self.t1 is not None:
            m1 = tucker_factor(self.t1, self.w1_a, self.w1_b)
            m2 = tucker_factor(self.t2, self.w2_a, self.w2_b)
        else:
            m1 = self.w1_a.float() @ self.w1_b.float()
            m2 = self.w2_a.float() @ self.w2_b.float()
        return reshape_to(m1 * m2 * self.scale, shape, self.name)
