"""What every adapter type shares: its scale rule, its optional DoRA magnitude and bias delta."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from library.errors import LoraToolsError


def alpha_value(alpha: torch.Tensor | float | None) -> float | None:
    """A stored alpha as a float; None when absent."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):
        return float(alpha.detach().float().reshape(-1)[0]) if alpha.numel() else None
    return float(alpha)


def scale_for(alpha: float | None, rank: int) -> float:
    """alpha / rank, where an absent or zero alpha means alpha = rank (every trainer's convention)."""
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


class DoraMagnitude:
    """A DoRA magnitude vector and the axis its norm is taken over.

    axis "in": one norm per input column (LyCORIS < 3.2, `dora_scale` [1, in]);
    axis "out": one norm per output row (LyCORIS >= 3.2 `wd_on_out`, PEFT, AI-Toolkit).
    """

    def __init__(self, magnitude: torch.Tensor, axis: str):
        if axis not in ("in", "out"):
            raise ValueError(f"DoRA axis must be 'in' or 'out', not {axis!r}")
        self.magnitude = magnitude
        self.axis = axis

    @classmethod
    def from_dora_scale(cls, scale: torch.Tensor, name: str = "", axis: str | None = None) -> DoraMagnitude:
        if axis is None:
            if scale.dim() == 1:
                axis = "out"  # PEFT / AI-Toolkit store a plain [out] vector
            elif scale.shape[0] == 1 and scale.dim() >= 2 and scale.shape[1] != 1:
                axis = "in"
            elif scale.dim() >= 2 and scale.shape[1] == 1:
                axis = "out"
            else:
                raise LoraToolsError(f"cannot tell the DoRA norm axis from dora_scale shape {tuple(scale.shape)}",
                                     key=name)
        return cls(scale, axis)

    def norm_of(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W‖ along this magnitude's axis, shaped to broadcast against W."""
        if self.axis == "out":
            return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        cols = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        return cols.reshape(1, -1, *[1] * (weight.dim() - 2))

    def apply(self, merged: torch.Tensor) -> torch.Tensor:
        """m · W' / ‖W'‖ for the already-updated weight W' = W + ΔW."""
        norm = self.norm_of(merged)
        if self.axis == "out":
            mag = self.magnitude.reshape(-1, *[1] * (merged.dim() - 1))
        else:
            mag = self.magnitude.reshape(1, -1, *[1] * (merged.dim() - 2))
        return merged * (mag.to(merged.dtype) / norm)


class Adapter(ABC):
    """One module's adapter. `delta()` includes the alpha scale but never the user's strength."""

    kind: str = ""

    def __init__(self, name: str = "", alpha: float | None = None, dora: DoraMagnitude | None = None,
                 bias_delta: torch.Tensor | None = None):
        self.name = name
        self.alpha = alpha
        self.dora = dora
        self.bias_delta = bias_delta

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    @abstractmethod
    def delta(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The full weight delta in float32, reshaped to `shape` when given (needed for flattened convs)."""

    def delta_with_base(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The change this adapter makes to `weight` at `strength`, in float32.

        For DoRA the ComfyUI/A1111 rule is used: W_final = W + s·(W_dora − W), so strength 0 is
        the base model and strength 1 is exactly the trained DoRA weight.
        """
        base = weight.float()
        delta = self.delta(tuple(weight.shape))
        if self.dora is None:
            return strength * delta
        return strength * (self.dora.apply(base + delta) - base)

    def describe(self) -> str:
        rank = f" rank {self.rank}" if self.rank is not None else ""
        dora = f" +DoRA({self.dora.axis})" if self.dora is not None else ""
        return f"{self.kind}{rank}{dora}"


def identity_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with a @ b = w exactly, rank min(w.shape): one side is w itself, the other an identity."""
    m, n = w.shape
    if m <= n:
        return torch.eye(m, dtype=w.dtype), w
    return w, torch.eye(n, dtype=w.dtype)


def reshape_to(delta: torch.Tensor, shape: tuple[int, ...] | None, name: str) -> torch.Tensor:
    if shape is None or tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != _numel(shape):
        raise LoraToolsError(f"adapter delta of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}",
                             key=name)
    return delta.reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
