"""Streaming a checkpoint merge: every input opened lazily, one key of every input in memory at a time.

Each merged key is read from each model (plain reads into its own buffer, not the mmap, whose touched pages
would stay resident), widened to the compute dtype (float32 at least: fp8 and fp16 sums mean nothing in
their own type), merged, clamped to the output dtype's range and cast back, and written at its planned
offset; copied keys go byte for byte when their dtype is kept. A key's value depends only on its own
tensors (and DARE's per-key seed), so the result does not depend on the order keys are visited.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from library.model_merge import MergeSettings, merge_key
from library.model_merge_plan import MergePlan
from library.model_normalize import normalized
from library.safetensors_io import DTYPE_NAMES, StreamingWriter, cast_clamped, open_checkpoint


@dataclass
class Rounding:
    """What casting the merged values to their storage dtype took away (‖cast − exact‖ / ‖exact‖)."""

    error_sq: float = 0.0
    norm_sq: float = 0.0
    clamped: int = 0
    worst: tuple[float, str] = (0.0, "")
    dtypes: set = field(default_factory=set)

    def store(self, key: str, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`exact` cast to `dtype` (clamped to its range only where a value lies outside it), measured."""
        if dtype == exact.dtype:
            return exact
        self.dtypes.add(DTYPE_NAMES[dtype])
        top = torch.finfo(dtype).max
        stored = None
        if exact.numel() and top < torch.finfo(exact.dtype).max:
            low, high = torch.aminmax(exact)
            if float(low) < -top or float(high) > top:
                self.clamped += int((exact.abs() > top).sum())
                stored = cast_clamped(exact, dtype)
        stored = exact.to(dtype) if stored is None else stored
        # Fused norms in the compute dtype: no float64 copies of the tensor.
        err = float(torch.linalg.vector_norm(stored.to(exact.dtype) - exact)) ** 2
        norm = float(torch.linalg.vector_norm(exact)) ** 2
        self.error_sq += err
        self.norm_sq += norm
        rel = math.sqrt(err / norm) if norm > 0 else 0.0
        if rel > self.worst[0]:
            self.worst = (rel, key)
        return stored

    def line(self) -> str | None:
        if not self.dtypes:
            return None
        rel = math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0
        out = f"rounding to {'/'.join(sorted(self.dtypes))}: relative error {rel:.3g} overall"
        if self.worst[1]:
            out += f", worst {self.worst[0]:.3g} ({self.worst[1]})"
        return out + (f"; {self.clamped} values clamped to the dtype's range" if self.clamped else "")


class MergeInputs(ExitStack):
    """The models, the base and the mask, opened lazily and closed together."""

    def __init__(self, models: Sequence[str], base: str | None = None, mask: str | None = None):
        super().__init__()
        try:
            self.models = [self.enter_context(open_checkpoint(p)) for p in models]
            self.base = self.enter_context(open_checkpoint(base)) if base else None
            if mask:
                from library.mask_file import read_mask

                self.mask = self.enter_context(read_mask(mask))
            else:
                self.mask = None
        except BaseException:
            self.close()
            raise

    def files(self) -> list[str]:
        readers = [*self.models, *([self.base] if self.base is not None else [])]
        return [f for r in readers for f in r.files()]


def _wide(reader, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return reader.read(key).to(device=device, dtype=dtype)


def run_merge(inputs: MergeInputs, plan: MergePlan, settings: MergeSettings, writer: StreamingWriter, *,
              compute: torch.dtype = torch.float32, device: torch.device | None = None, normalize: str | None = None,
              order: Sequence[str] | None = None, on_key: Callable[[], None] | None = None) -> Rounding:
    """Write every planned key into `writer` (in `order`, default the plan's) and return the rounding."""
    device = device or torch.device("cpu")
    compute = compute if compute.itemsize >= 4 else torch.float32
    rounding = Rounding()
    by_key = {k.key: k for k in plan.keys}
    models = inputs.models

    def read_all(key: str) -> list[torch.Tensor] | None:
        if not all(key in m for m in models):
            return None
        return [_wide(m, key, compute, device) for m in models]

    for key in order or list(by_key):
        item = by_key[key]
        source = models[item.source]
        if not item.merge:
            if source.dtype(key) == item.dtype:
                source.copy_into(writer, key)
            else:
                writer.write(key, cast_clamped(source.read(key), item.dtype))
        else:
            tensors = normalized(key, read_all(key), normalize, read_all)
            base = _wide(inputs.base, key, compute, device) if inputs.base is not None else None
            mask = inputs.mask.get(key) if inputs.mask is not None else None
            exact = merge_key(key, tensors, base, settings, item.strength, mask, consume=True)
            del tensors, base, mask
            writer.write(key, rounding.store(key, exact, item.dtype).cpu())
        if on_key is not None:
            on_key()
    return rounding
