"""Streaming execution of a merge plan: read the checkpoint tensor by tensor, add the planned deltas,
write the result with the header planned up front.

Memory stays bounded by the largest stored tensor, whatever the checkpoint size:
- untouched tensors are copied as raw bytes (bit for bit when their dtype is kept);
- a changed tensor is read with plain file reads into its own buffer (not through the mmap, whose
  touched pages would otherwise stay resident and grow with the file), and the delta is built and
  added in row chunks, so the float32 work area is `chunk_elements`, not the tensor;
- low-rank adapters never form their full delta: each chunk is `up[rows] @ down`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from library.checks import NonFiniteTracker
from library.merge_plan import Contribution, Plan
from library.safetensors_io import LazyReader, StreamingWriter
from library.weight_update import add_delta

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per work chunk


@dataclass
class KeyStats:
    key: str
    intended_sq: float = 0.0
    error_sq: float = 0.0
    clamped: int = 0

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.intended_sq) if self.intended_sq > 0 else 0.0


@dataclass
class ApplyResult:
    changed: list[KeyStats] = field(default_factory=list)
    copied: int = 0
    cast: int = 0

    def worst(self, n: int = 5) -> list[KeyStats]:
        return sorted(self.changed, key=lambda s: -s.relative_error)[:n]


def read_tensor(reader, key: str) -> torch.Tensor:
    """The stored tensor, read into a private buffer with file reads (see module docstring)."""
    header = getattr(reader, "header", None)
    if not isinstance(reader, LazyReader) or header is None:
        return reader.get(key)
    info = header.tensors[key]
    buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
    with open(reader.path, "rb") as f:
        f.seek(header.data_start + info.begin)
        got = f.readinto(buf.numpy()) if buf.numel() else 0
    if got != buf.numel():
        from library.errors import LoraToolsError

        raise LoraToolsError("file ends inside the tensor", file=reader.path, key=key)
    return buf.view(reader.dtype(key)).reshape(info.shape)


@dataclass
class _Piece:
    """Stored rows [start, stop) of one contribution: `up[i:j] @ down`, or rows of a dense delta."""

    start: int
    stop: int
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def rows(self, i: int, j: int) -> torch.Tensor:
        if self.dense is not None:
            return self.dense[i:j]
        return self.up[i:j] @ self.down


def _to_stored_order(t: torch.Tensor, c: Contribution) -> torch.Tensor:
    """Target rows → the rows this placement covers, in the stored order (halves swapped if so)."""
    rows = c.placement.target_rows
    if rows is not None:
        t = t[rows[0]:rows[1]]
    if c.placement.swap:
        half = t.shape[0] // 2
        t = torch.cat([t[half:], t[:half]])
    return t


def _piece(c: Contribution, stored: torch.Tensor, device: torch.device) -> _Piece:
    rows = c.placement.checkpoint_rows or (0, stored.shape[0])
    width = math.prod(stored.shape[1:])
    adapter = c.adapter
    if c.bias:
        delta = adapter.bias_delta.float() * (c.strength * c.bias_scale)
        return _Piece(*rows, dense=_to_stored_order(delta, c).reshape(-1, 1).to(device))
    if adapter.dora is not None:
        # DoRA renormalises W + ΔW, so its change depends on the base weight (of this target's rows).
        base = stored[rows[0]:rows[1]].float()
        if c.placement.swap:
            half = base.shape[0] // 2
            base = torch.cat([base[half:], base[:half]])
        delta = adapter.delta_with_base(base.reshape(c.target.shape), c.strength)
        return _Piece(*rows, dense=_to_stored_order(delta, c).reshape(-1, width).to(device))
    if adapter.kind == "lora":
        up, down = adapter.factors()
        return _Piece(*rows, up=_to_stored_order(up * c.strength, c).to(device), down=down.to(device))
    delta = adapter.delta(c.target.shape) * c.strength
    return _Piece(*rows, dense=_to_stored_order(delta.reshape(delta.shape[0], -1), c).to(device))


def updated_tensor(stored: torch.Tensor, contributions: list[Contribution], *, out_dtype: torch.dtype,
                   compute_dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                   chunk_elements: int = CHUNK_ELEMENTS, stats: KeyStats | None = None) -> torch.Tensor:
    """`stored + Σ strength·ΔW` over the planned rows, computed in row chunks, cast to `out_dtype`."""
    device = device or torch.device("cpu")
    shape = tuple(stored.shape) if stored.dim() else (1,)
    flat = stored.reshape(shape[0], -1)
    width = flat.shape[1]
    pieces = [_piece(c, stored.reshape(shape), device) for c in contributions]
    out = torch.empty(flat.shape, dtype=out_dtype)
    step = max(1, chunk_elements // max(width, 1))
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        delta = torch.zeros((b - a, width), dtype=torch.float32, device=device)
        for p in pieces:
            i, j = max(a, p.start), min(b, p.stop)
            if i < j:
                delta[i - a:j - a] += p.rows(i - p.start, j - p.start).to(torch.float32)
        new, st = add_delta(flat[a:b].to(device), delta, compute_dtype=compute_dtype, out_dtype=out_dtype,
                            measure=stats is not None)
        out[a:b] = new.cpu()
        if st is not None:
            stats.intended_sq += st.intended_norm ** 2
            stats.error_sq += st.error_norm ** 2
            stats.clamped += st.clamped
    return out.reshape(stored.shape)


def file_order(reader) -> list[str]:
    """Keys in the order their bytes lie in the file, so reads and writes stream sequentially."""
    header = getattr(reader, "header", None)
    keys = list(reader.keys())
    if header is None:
        return keys
    return sorted(keys, key=lambda k: header.tensors[k].begin)


def apply_plan(reader, plan: Plan, save_to: str, *, metadata: Mapping[str, str] | None,
               save_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
               device: torch.device | None = None, inputs=(), overwrite: bool = False,
               progress: Callable | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> ApplyResult:
    """Write `reader`'s checkpoint with `plan` applied to `save_to` (atomically; nothing left on error)."""
    keys = file_order(reader)

    def out_dtype(key: str) -> torch.dtype:
        dtype = reader.dtype(key)
        return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype

    specs = {k: (out_dtype(k), tuple(reader.shape(k))) for k in keys}
    result = ApplyResult()
    nonfinite = NonFiniteTracker("merged")
    iterator = progress(keys) if progress else keys
    with StreamingWriter(save_to, specs, metadata, inputs=inputs, overwrite=overwrite) as writer:
        for key in iterator:
            contributions = plan.contributions.get(key)
            dtype = specs[key][0]
            if not contributions and dtype == reader.dtype(key):
                writer.write_raw(key, reader.get_raw(key))
                result.copied += 1
                continue
            stored = read_tensor(reader, key)
            if not contributions:
                writer.write(key, stored)  # the writer casts (clamped) to the planned dtype
                result.cast += 1
                continue
            stats = KeyStats(key)
            new = updated_tensor(stored, contributions, out_dtype=dtype, compute_dtype=compute_dtype, device=device,
                                 chunk_elements=chunk_elements, stats=stats)
            nonfinite.check(key, new)
            writer.write(key, new)
            result.changed.append(stats)
    nonfinite.warn()
    return result
