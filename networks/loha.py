"""LoHa: ΔW = (α/r)·(w1_a @ w1_b) ⊙ (w2_a @ w2_b), or with Tucker cores for k×k convs."""

from __future__ import annotations

import torch

from networks.base import Adapter, DoraMagnitude, reshape_to, scale_for


def tucker_factor(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """M[p, q, …] = Σ_ij core[i, j, …]·w_b[j, q]·w_a[i, p] (LyCORIS' transposed Tucker layout)."""
    return torch.einsum("ij...,jq,ip->pq...", core.float(), w_b.float().reshape(w_b.shape[0], -1),
                        w_a.float().reshape(w_a.shape[0], -1))


def tucker_pair(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [out, r], b [r, in·kh·kw]) in float64 with a @ b = `tucker_factor` flattened: aᵀ = w_a, b = core ×₂ w_b."""
    inner = torch.einsum("ij...,jq->iq...", core.double(), w_b.double().reshape(w_b.shape[0], -1))
    return w_a.double().reshape(w_a.shape[0], -1).T.contiguous(), inner.reshape(inner.shape[0], -1)


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

    def _pair(self, i: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [out, r], b [r, in·kh·kw]) in float64 with a @ b = the i-th Hadamard factor (flattened)."""
        w_a, w_b, core = getattr(self, f"w{i}_a"), getattr(self, f"w{i}_b"), getattr(self, f"t{i}")
        if core is not None:
            return tucker_pair(core, w_a, w_b)
        return w_a.double(), w_b.double().reshape(w_b.shape[0], -1)

    @property
    def exact_rank(self) -> int:
        """Rank of the exact LoRA form (`exact_factors`): r1·r2."""
        return int(self.w1_b.shape[0]) * int(self.w2_b.shape[0])

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r1·r2], down [r1·r2, in·kh·kw]) in float64, up @ down = ΔW / scale (flattened).

        (A1 B1) ⊙ (A2 B2) = U V with U[i, (p, q)] = A1[i, p]·A2[i, q] and V[(p, q), j] = B1[p, j]·B2[q, j]
        (the row-wise Khatri–Rao products): an exact LoRA of rank r1·r2. Products of two float32 (or
        16-bit) values are exact in float64.
        """
        a1, b1 = self._pair("1")
        a2, b2 = self._pair("2")
        up = (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)
        down = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
        return up, down
