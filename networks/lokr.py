"""LoKr: ΔW = scale·kron(w1, w2), each factor full or decomposed, w2 optionally with a Tucker core.

With a row window (offset, rows) — ComfyUI's `.row_offset`, written when it splits a LoKr trained on a fused
qkv whose outer factor cannot be split at the q/k/v boundaries — the module's delta is rows
[offset, offset + rows) of that product (ComfyUI's `lora_diff.narrow(0, offset, rows)`).
"""

from __future__ import annotations

import torch

from library.errors import LoraToolsError
from networks.base import Adapter, DoraMagnitude, identity_factors, reshape_to, scale_for
from networks.loha import tucker_factor, tucker_pair


class LoKrAdapter(Adapter):
    kind = "lokr"

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float | None = None, *, name: str = "",
                 dora: DoraMagnitude | None = None, bias_delta: torch.Tensor | None = None,
                 window: tuple[int, int] | None = None):
        super().__init__(name, alpha, dora, bias_delta)
        self.tensors = tensors
        self.window = window
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
        # torch.kron needs contiguous inputs (a Tucker w2 comes out of einsum permuted)
        full = torch.kron(w1.contiguous(), w2.contiguous())
        return reshape_to(self._rows(full) * self.scale, shape, self.name)

    def _rows(self, product: torch.Tensor) -> torch.Tensor:
        """The window's rows of the Kronecker product (all of them without a window)."""
        if self.window is None or product.shape[0] == self.window[1]:
            return product  # ComfyUI narrows only a product larger than the weight
        offset, rows = self.window
        if offset + rows > product.shape[0]:
            raise LoraToolsError(f"row window [{offset}, {offset + rows}) is outside the LoKr's {product.shape[0]} "
                                 "rows", key=self.name)
        return product[offset:offset + rows]

    def _pair(self, i: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in float64 with a @ b = w_i (flattened to 2-D): the stored decomposition, else w_i and an identity."""
        t = self.tensors
        if f"lokr_w{i}" in t:
            w = t[f"lokr_w{i}"].double()
            return identity_factors(w.reshape(w.shape[0], -1))
        w_a, w_b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
        if f"lokr_t{i}" in t:
            return tucker_pair(t[f"lokr_t{i}"], w_a, w_b)
        return w_a.double(), w_b.double().reshape(w_b.shape[0], -1)

    @property
    def exact_rank(self) -> int:
        """Rank of the exact LoRA form (`exact_factors`): r1·r2, a full factor counting its smaller side."""
        out = 1
        for i in ("1", "2"):
            w = self.tensors.get(f"lokr_w{i}")
            if w is not None:
                out *= min(int(w.shape[0]), w[0].numel())
            else:
                out *= int(self.tensors[f"lokr_w{i}_b"].shape[0])
        return out

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, R], down [R, in·kh·kw]) in float64 with up @ down = ΔW / scale (flattened).

        kron(A1 B1, A2 B2) = kron(A1, A2) @ kron(B1, B2), so R = r1·r2, where a full factor counts its
        smaller side. The flattened 2-D kron is the weight's kron reshaped (see `delta`).
        """
        a1, b1 = self._pair("1")
        a2, b2 = self._pair("2")
        return self._rows(kron_2d(a1, a2)), kron_2d(b1, b2)


def kron_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """kron of two matrices by broadcasting. Not torch.kron: it views its inputs, and a transposed
    factor with a size-1 side passes `is_contiguous()` with strides its view cannot take."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
