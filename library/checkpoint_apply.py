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
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from library.checks import NonFiniteTracker
from library.merge_plan import Contribution, Plan
from library.safetensors_io import StreamingWriter

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per work buffer: the chunk loop runs in cache
CHUNK_ELEMENTS_GPU = 1 << 24
WORKERS = 2  # threads reading and computing changed tensors
IN_FLIGHT = 3  # changed tensors held at once (read, being computed, or waiting to be written)


@dataclass
class KeyStats:
    key: str
    intended_sq: float = 0.0
    error_sq: float = 0.0

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


@dataclass
class _Piece:
    """Stored rows [start, stop) of one contribution: `up[i:j] @ down`, or rows of a dense delta."""

    start: int
    stop: int
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def add_rows(self, into: torch.Tensor, i: int, j: int) -> None:
        """into += rows [i, j) of this piece's delta (a fused multiply-add for low-rank pieces)."""
        if self.dense is not None:
            into.add_(self.dense[i:j].to(into.dtype))
        else:
            into.addmm_(self.up[i:j].to(into.dtype), self.down.to(into.dtype))


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
                   chunk_elements: int | None = None, stats: KeyStats | None = None) -> torch.Tensor:
    """`stored + Σ strength·ΔW` over the planned rows, computed in row chunks, cast (clamped) to `out_dtype`.

    Not one whole-tensor `stored.float() + delta`: that allocates several full-size float32
    temporaries per weight, which on SDXL-sized weights costs ~20× more than this loop, whose chunk
    buffers are allocated once and stay in cache. With `stats`, ‖intended delta‖² and ‖realized − intended‖²
    (what the storage dtype's rounding and range clamping took away) are accumulated; that costs a few
    more passes per chunk, so callers ask for it where it matters (8-bit outputs, --verbose).
    """
    device = device or torch.device("cpu")
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS_GPU
    # fp8 weights need a wide type for the sum to mean anything; never compute below float32.
    work = compute_dtype if compute_dtype.itemsize >= 4 else torch.float32
    shape = tuple(stored.shape) if stored.dim() else (1,)
    flat = stored.reshape(shape[0], -1)
    width = flat.shape[1]
    pieces = [_piece(c, stored.reshape(shape), device) for c in contributions]
    out = torch.empty(flat.shape, dtype=out_dtype)
    step = max(1, chunk_elements // max(width, 1))
    acc = torch.empty((min(step, shape[0]), width), dtype=work, device=device)
    delta = torch.empty_like(acc) if stats is not None else None
    err = torch.empty_like(acc) if stats is not None else None
    limit = torch.finfo(out_dtype).max if out_dtype.is_floating_point else None
    narrower = limit is not None and limit < torch.finfo(work).max
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        x = acc[:b - a]
        x.copy_(flat[a:b])
        # Without stats the pieces accumulate straight into W's rows (addmm_: no delta buffer, no extra pass).
        d = delta[:b - a].zero_() if stats is not None else x
        for p in pieces:
            i, j = max(a, p.start), min(b, p.stop)
            if i < j:
                p.add_rows(d[i - a:j - a], i - p.start, j - p.start)
        if stats is not None:
            x.add_(d)
        if narrower:
            x.clamp_(-limit, limit)  # a cast never creates inf (cf. safetensors_io.cast_clamped)
        chunk = out[a:b]
        chunk.copy_(x)
        if stats is not None:
            e = err[:b - a]
            e.copy_(chunk)
            e.sub_(x)  # realized − intended = (out − W) − (x − W): the storage rounding (and clamping)
            stats.intended_sq += float(torch.dot(d.reshape(-1), d.reshape(-1)))
            stats.error_sq += float(torch.dot(e.reshape(-1), e.reshape(-1)))
    return out.reshape(stored.shape)


def file_order(reader) -> list[str]:
    """Keys in the order their bytes lie in the file(s), so reads and writes stream sequentially."""
    return reader.file_order()


def apply_plan(reader, plan: Plan, save_to: str, *, metadata: Mapping[str, str] | None,
               save_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
               device: torch.device | None = None, inputs=(), overwrite: bool = False,
               progress: Callable | None = None, chunk_elements: int | None = None,
               measure: bool | None = None) -> ApplyResult:
    """Write `reader`'s checkpoint with `plan` applied to `save_to` (atomically; nothing left on error).

    `measure`: record what the storage precision took from each delta (see `updated_tensor`); by default
    only for 8-bit outputs, where a LoRA can vanish in the rounding.
    """
    keys = file_order(reader)

    def out_dtype(key: str) -> torch.dtype:
        dtype = reader.dtype(key)
        return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype

    specs = {k: (out_dtype(k), tuple(reader.shape(k))) for k in keys}
    result = ApplyResult()
    nonfinite = NonFiniteTracker("merged")
    iterator = progress(keys) if progress else keys  # must yield `keys` (file order, so reads stream)
    with one_thread(device is None or device.type == "cpu"):
        _stream(reader, plan, save_to, specs, metadata, inputs, overwrite, iterator, compute_dtype, device,
                chunk_elements, result, nonfinite, measure)
    nonfinite.warn()
    return result


@contextmanager
def one_thread(enabled: bool = True):
    """Run torch single-threaded inside the block.

    Streaming merges are many small, memory-bound ops; with intra-op threads each op waits for the
    OpenMP hand-off, which dominates when the machine is busy: measured on 2 shared cores, reading two
    SDXL LoRAs took 18 s with 2 threads and 0.9 s with one, and the chunk loop was ~10× faster. The
    cores are used instead by `_stream`'s worker threads, one tensor each.
    """
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stream(reader, plan, save_to, specs, metadata, inputs, overwrite, iterator, compute_dtype, device, chunk_elements,
            result, nonfinite, measure) -> None:
    def job(key: str, dtype: torch.dtype, contributions) -> KeyStats | None:
        stored = reader.read(key)  # its own buffer, not the mmap (see the module docstring)
        if not contributions:
            writer.write(key, stored)  # the writer casts (clamped) to the planned dtype
            return None
        measured = measure if measure is not None else dtype.itemsize == 1
        stats = KeyStats(key) if measured else None
        new = updated_tensor(stored, contributions, out_dtype=dtype, compute_dtype=compute_dtype, device=device,
                             chunk_elements=chunk_elements, stats=stats)
        writer.write(key, new)
        return stats or KeyStats(key)

    def finish(key: str, future) -> None:
        stats = future.result()
        if stats is None:
            result.cast += 1
            return
        if stats.intended_sq or stats.error_sq:  # measured: NaN/inf in W or ΔW makes a sum non-finite
            nonfinite.check(key, torch.tensor(stats.intended_sq + stats.error_sq))
        result.changed.append(stats)

    # Changed tensors are read, computed and written by two worker threads (file reads, torch ops and writes
    # release the GIL, so both cores work, and the disk works while they compute); the writer accepts
    # tensors in any order, so a large tensor ahead does not hold back the writing of those behind it
    # (written by the main thread they waited for it: 35.4 against 39.8 s into an SDXL checkpoint). At most
    # IN_FLIGHT tensors are held at once. Untouched tensors are copied by the main thread meanwhile.
    with StreamingWriter(save_to, specs, metadata, inputs=inputs, overwrite=overwrite) as writer, \
            ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque = deque()
        for key in iterator:
            contributions = plan.contributions.get(key)
            dtype = specs[key][0]
            if not contributions and dtype == reader.dtype(key):  # untouched: copied byte for byte
                reader.copy_into(writer, key)
                result.copied += 1
                continue
            pending.append((key, pool.submit(job, key, dtype, contributions)))
            while len(pending) > IN_FLIGHT:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
