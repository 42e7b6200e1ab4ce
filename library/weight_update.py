"""Adding a delta to one stored weight: compute wide, clamp, cast back, and measure what was lost.

Low-precision checkpoints (fp16, bf16 and above all fp8) cannot hold every `W + ΔW`: the cast rounds
and a small delta may vanish entirely. We report the realized delta against the intended one so that
users see when a LoRA was mostly rounded away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from library.safetensors_io import cast_clamped


@dataclass
class UpdateStats:
    intended_norm: float
    error_norm: float
    clamped: int

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.intended_norm if self.intended_norm > 0 else 0.0


def add_delta(weight: torch.Tensor, delta: torch.Tensor, *, compute_dtype: torch.dtype = torch.float32,
              out_dtype: torch.dtype | None = None, measure: bool = True) -> tuple[torch.Tensor, UpdateStats | None]:
    """`weight + delta` computed in `compute_dtype` (at least fp32 for fp8 weights), stored as `out_dtype`.

    Returns the new weight and, when `measure`, how far the realized change (after rounding and clamping)
    is from `delta`.
    """
    out_dtype = out_dtype or weight.dtype
    if compute_dtype.itemsize < 4 and weight.dtype.itemsize == 1:
        compute_dtype = torch.float32  # fp8 values need a wide type for the sum to mean anything
    base = weight.to(compute_dtype)
    summed = base + delta.to(device=base.device, dtype=compute_dtype)
    stored = cast_clamped(summed, out_dtype)
    if not measure:
        return stored, None
    if out_dtype.is_floating_point:
        info = torch.finfo(out_dtype)
        clamped = int(((summed > info.max) | (summed < info.min)).sum())
    else:
        clamped = 0
    realized = stored.to(torch.float32) - weight.to(torch.float32)
    intended = delta.to(device=realized.device, dtype=torch.float32)
    stats = UpdateStats(float(intended.norm()), float((realized - intended).norm()), clamped)
    return stored, stats
