"""Streaming a checkpoint merge: every input opened lazily, one key of every input in memory at a time.

Each merged key is read from each model (plain reads into its own buffer, not the mmap, whose touched pages
would stay resident), widened to the compute dtype (float32 at least: fp8 and fp16 sums mean nothing in
their own type), merged, clamped to the output dtype's range and cast back, and written at its planned
offset; copied keys go byte for byte when their dtype is kept. A key's value depends only on its own
tensors (and DARE's per-key seed), so the result does not depend on the order keys are visited; they are
visited in model A's file order, so that every input is read front to back.

Every merge goes through each tensor in chunks of `chunk_elements` flat elements: a slice of every input
is read from its file offset, merged, measured and written at its offset, so the memory held is a few MiB per
input (never over CHUNK_BUDGET in all), whatever the size of the largest tensor. Elementwise merges
(weighted_sum, add_difference, task_arithmetic, with block/key weights, --te_ratio and --mask;
`model_merge.is_elementwise`) need nothing else and are bit-identical to the whole-tensor `linear_merge`.
TIES, magnitude_prune, DARE, slerp, --protect_a and --normalize need statistics of the whole tensor (ranks
of |τ|, the angle, norms, of this key or of its query projection): a first pass measures them
(library.model_merge_chunked, model_normalize.scalings: one float32 buffer of one task's |τ| is the only
whole-tensor memory), the second merges chunk by chunk, bit-identical to `merge_key` on whole tensors.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from library.checkpoint_apply import one_thread
from library.model_merge import MergeSettings, is_elementwise, linear_merge
from library.model_merge_chunked import measure, merge_chunk
from library.model_merge_plan import MergePlan
from library.model_normalize import flat_norm, scale_chunk, scalings
from library.safetensors_io import DTYPE_NAMES, StreamingWriter, cast_clamped, open_checkpoint
from library.stream_hash import StreamHasher

WORKERS = 2  # threads merging keys side by side
IN_FLIGHT = 6  # merged keys submitted at once (only the WORKERS running ones hold memory)
CHUNK_BUDGET = 192 << 20  # bytes of compute-dtype chunks alive at once (inputs, base, result, temporaries)
# 1 MiB of float32 per tensor: the chunk of every input, the result and the temporaries stay in the caches,
# so the dozen elementwise passes of a chunk cost little more than its read. Measured on 2 shared cores (3
# fp16 inputs, 300 MB each): 2.5 s of CPU at 2^18 elements, 3.7 s at 2^22 (each pass out to memory).
MAX_CHUNK_ELEMENTS = 1 << 18
_CHUNK_ALIGN = 1 << 12  # chunks start at multiples of this: whole bytes of a bit-packed mask


@dataclass
class Rounding:
    """What casting the merged values to their storage dtype took away (‖cast − exact‖ / ‖exact‖)."""

    error_sq: float = 0.0
    norm_sq: float = 0.0
    clamped: int = 0
    worst: tuple[float, str] = (0.0, "")
    dtypes: set = field(default_factory=set)  # the dtypes whose rounding was measured
    # Measure ‖cast − exact‖ for every dtype, or only for 8-bit ones, where a merge can vanish in the rounding
    # (merge_lora's rule; --verbose measures all). Unmeasured 16-bit casts are still clamped where they overflow.
    measure_all: bool = True
    # (error², norm², clamped) of each key being stored in chunks: a worker thread stores its own key's chunks,
    # and only `end_key` (one thread) adds them to the totals.
    _key: dict = field(default_factory=dict, repr=False)

    def store(self, key: str, exact: torch.Tensor, dtype: torch.dtype,
              scratch: Callable[[int, torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
        """`exact` (a key's tensor or a chunk of it) cast to `dtype`, clamped to its range only where a value
        lies outside it, and measured; call `end_key` once the key's last chunk is stored. `scratch(slot,
        dtype)` gives reusable buffers shaped like `exact` for the cast and the error (the result is then a
        view of one: write it before the next chunk)."""
        if dtype == exact.dtype:
            return exact

        def cast(x: torch.Tensor, to: torch.dtype, slot: int) -> torch.Tensor:
            return x.to(to) if scratch is None else scratch(slot, to).copy_(x)

        top = torch.finfo(dtype).max
        if not self.measure_all and dtype.itemsize > 1:
            stored = cast(exact, dtype, 0)
            if exact.numel() and top < torch.finfo(exact.dtype).max and bool(stored.isinf().any()) \
                    and bool((exact.abs() > top).any()):
                stored = self._clamp(key, exact, dtype)
            return stored
        self.dtypes.add(DTYPE_NAMES[dtype])
        stored = None
        if not _overflows_to_inf(dtype) and exact.numel() and top < torch.finfo(exact.dtype).max:
            low, high = torch.aminmax(exact)  # fp8 e4m3fn saturates (or gives NaN): look before the cast
            if float(low) < -top or float(high) > top:
                stored = self._clamp(key, exact, dtype)
        searched = stored is not None
        stored = cast(exact, dtype, 0) if stored is None else stored
        # ‖stored − exact‖ (the difference taken in place: one temporary), fused in the compute dtype. Where
        # the cast makes inf of a value past the range (fp16, bf16, e5m2), the error is not finite: only then
        # is the chunk searched and clamped, so no aminmax pass over every chunk. A value that rounds down to
        # the largest finite one needs no clamp and gives the same bytes either way.
        err = float(torch.linalg.vector_norm(cast(stored, exact.dtype, 1).sub_(exact))) ** 2
        if not searched and not math.isfinite(err) and bool((exact.abs() > top).any()):
            stored = self._clamp(key, exact, dtype)
            err = float(torch.linalg.vector_norm(cast(stored, exact.dtype, 1).sub_(exact))) ** 2
        norm = float(torch.linalg.vector_norm(exact)) ** 2
        pending = self._key.get(key, (0.0, 0.0, 0))
        self._key[key] = (pending[0] + err, pending[1] + norm, pending[2])
        return stored

    def _clamp(self, key: str, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        err, norm, clamped = self._key.get(key, (0.0, 0.0, 0))
        self._key[key] = (err, norm, clamped + int(torch.count_nonzero(exact.abs() > torch.finfo(dtype).max)))
        return cast_clamped(exact, dtype)

    def end_key(self, key: str) -> None:
        err, norm, clamped = self._key.pop(key, (0.0, 0.0, 0))
        self.error_sq += err
        self.norm_sq += norm
        self.clamped += clamped
        rel = math.sqrt(err / norm) if norm > 0 else 0.0
        if rel > self.worst[0]:
            self.worst = (rel, key)

    def line(self) -> str | None:
        if not self.dtypes:
            return f"{self.clamped} values clamped to the output dtype's range" if self.clamped else None
        rel = math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq > 0 else 0.0
        out = f"rounding to {'/'.join(sorted(self.dtypes))}: relative error {rel:.3g} overall"
        if self.worst[1]:
            out += f", worst {self.worst[0]:.3g} ({self.worst[1]})"
        return out + (f"; {self.clamped} values clamped to the dtype's range" if self.clamped else "")


@functools.cache
def _overflows_to_inf(dtype: torch.dtype) -> bool:
    """Whether casting a float32 value past `dtype`'s range gives inf (fp16, bf16, fp8 e5m2) rather than the
    maximum or NaN (fp8 e4m3fn, which has no inf; torch versions differ in which)."""
    return bool(torch.tensor([torch.finfo(torch.float32).max]).to(dtype).float().isinf().all())


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

    def hash_while_reading(self, paths: Sequence[str]) -> StreamHasher:
        """A StreamHasher of `paths` fed by every read of these inputs (the merge hashes them as it goes)."""
        hasher = StreamHasher(paths)
        readers = [*self.models, *([self.base] if self.base is not None else []),
                   *([self.mask] if self.mask is not None else [])]
        for reader in readers:
            for single in reader.file_readers():
                single.tap = hasher.tap(single.path)
        return hasher


class Scratch:
    """Buffers of one worker thread reused from chunk to chunk. New tensors per chunk cost twice the arithmetic:
    a weighted sum of two fp16 chunks of 2¹⁸ elements, widened, took 2.65 ns per element with fresh tensors and
    1.2 ns with reused ones (measured on this 2-core VM), which stay in cache where new ones come cold."""

    _local = threading.local()

    def __init__(self):
        self._buffers: dict = {}

    @classmethod
    def of_thread(cls) -> Scratch:
        scratch = getattr(cls._local, "scratch", None)
        if scratch is None:
            scratch = cls._local.scratch = cls()
        return scratch

    def get(self, slot: object, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Buffer `slot` of `count` elements (a view of one kept as long as the largest asked for)."""
        key = (slot, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[key] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count]


def chunk_elements(n_inputs: int, compute: torch.dtype, budget: int = CHUNK_BUDGET, temporaries: int = 4) -> int:
    """Flat elements per chunk: the inputs, the base and `temporaries` more chunks of that many fit `budget`
    (a linear merge makes about three; TIES/DARE a task vector, a kept one and a stacked one per input)."""
    per_element = (n_inputs + temporaries) * compute.itemsize
    count = min(MAX_CHUNK_ELEMENTS, budget // per_element)
    return max(_CHUNK_ALIGN, count - count % _CHUNK_ALIGN)


def visiting_order(plan: MergePlan, first) -> list[str]:
    """Model A's keys in the order their bytes lie in its file, then the keys A lacks: every input made by
    the same tool is then read front to back, and its hash needs no second read."""
    planned = {k.key for k in plan.keys}
    order = [k for k in first.file_order() if k in planned]
    seen = set(order)
    return order + [k.key for k in plan.keys if k.key not in seen]


def _merge_in_chunks(inputs: MergeInputs, item, settings: MergeSettings, writer: StreamingWriter,
                     rounding: Rounding, compute: torch.dtype, device: torch.device, step: int,
                     normalize: str | None) -> None:
    key, count = item.key, math.prod(item.shape)
    models = inputs.models
    base_reader = inputs.base if inputs.base is not None and settings.has_base else None

    def raw(reader, k: str = key):
        return lambda start, stop: reader.read_flat(k, start, stop).to(device=device, dtype=compute)

    def norm_of(k: str, i: int, n: int) -> float | None:
        return flat_norm(raw(models[i], k), n) if k in models[i] else None

    segments = scalings(key, item.shape, len(models), normalize, norm_of,
                        lambda k: tuple(models[0].shape(k)) if k in models[0] else None)

    def reading(i: int):
        read = raw(models[i])
        if i == 0 or not segments[i - 1]:
            return read
        return lambda start, stop: scale_chunk(read(start, stop), start, segments[i - 1])

    readers = [reading(i) for i in range(len(models))]
    linear = is_elementwise(settings)
    if not linear:  # the first pass: what the method needs of the whole tensor (model_merge_chunked)
        stats = measure(key, count, settings, readers, raw(base_reader) if base_reader is not None else None,
                        item.strength)
    scratch = Scratch.of_thread()
    for start in range(0, count, step):
        stop = min(count, start + step)
        n = stop - start
        if linear and not any(segments):  # widened into reused buffers (the reads stay the hasher's)
            tensors = [scratch.get(("in", i), n, compute, device).copy_(m.read_flat(key, start, stop))
                       for i, m in enumerate(models)]
            base = scratch.get("base", n, compute, device).copy_(base_reader.read_flat(key, start, stop)) \
                if base_reader is not None else None
        else:
            tensors = [read(start, stop) for read in readers]
            base = raw(base_reader)(start, stop) if base_reader is not None else None
        mask = inputs.mask.get_flat(key, start, stop) if inputs.mask is not None else None
        if linear:
            exact = linear_merge(tensors, base, settings, item.strength, mask,
                                 scratch=lambda slot, n=n: scratch.get(("merge", slot), n, compute, device))
        else:
            exact = merge_chunk(tensors, base, settings, stats, item.strength, mask)
        del tensors, base, mask
        stored = rounding.store(key, exact, item.dtype,
                                scratch=lambda slot, dtype, n=n: scratch.get(("store", slot), n, dtype, device))
        writer.write_flat(key, start, stored.cpu())
        del exact, stored


def run_merge(inputs: MergeInputs, plan: MergePlan, settings: MergeSettings, writer: StreamingWriter, *,
              compute: torch.dtype = torch.float32, device: torch.device | None = None, normalize: str | None = None,
              order: Sequence[str] | None = None, on_key: Callable[[], None] | None = None,
              chunk: int | None = None, measure_all: bool = True) -> Rounding:
    """Write every planned key into `writer` (in `order`, default `visiting_order`) and return the rounding.
    `chunk`: flat elements per chunk of an elementwise merge (default `chunk_elements`; a multiple of 8).
    `measure_all`: measure the rounding of every cast (else of 8-bit outputs only; see Rounding)."""
    device = device or torch.device("cpu")
    compute = compute if compute.itemsize >= 4 else torch.float32
    rounding = Rounding(measure_all=measure_all)
    by_key = {k.key: k for k in plan.keys}
    models = inputs.models
    n_inputs = len(models) + (inputs.base is not None)
    step = chunk or chunk_elements(n_inputs, compute, temporaries=4 if is_elementwise(settings) else n_inputs + 6)
    if step % 8:
        raise ValueError(f"chunks of {step} elements would split a mask byte; use a multiple of 8")
    work = functools.partial(_merge_one, inputs=inputs, settings=settings, writer=writer, rounding=rounding,
                             compute=compute, device=device, normalize=normalize, step=step)

    def done(key: str) -> None:
        rounding.end_key(key)
        if on_key is not None:
            on_key()

    # Merged keys go to WORKERS threads, one key each (reads, torch's kernels and hashlib release the GIL, so
    # both cores merge while the hasher takes what is left); copied keys are copied by this thread meanwhile.
    # At most IN_FLIGHT keys are in work at once, each holding its chunks (and a first pass's |τ| buffer).
    with one_thread(device.type == "cpu"), ThreadPoolExecutor(max_workers=WORKERS) as pool:
        pending: deque = deque()
        try:
            for key in order or visiting_order(plan, models[0]):
                item = by_key[key]
                if not item.merge:
                    _copy_one(item, inputs, writer)
                    done(key)
                    continue
                pending.append((key, pool.submit(work, item)))
                while len(pending) >= IN_FLIGHT:
                    _finish(*pending.popleft(), done)
            while pending:
                _finish(*pending.popleft(), done)
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return rounding


def _finish(key: str, future, done: Callable[[str], None]) -> None:
    future.result()
    done(key)


def _copy_one(item, inputs: MergeInputs, writer: StreamingWriter) -> None:
    source = inputs.models[item.source]
    if source.dtype(item.key) == item.dtype:
        source.copy_into(writer, item.key)
    else:
        writer.write(item.key, cast_clamped(source.read(item.key), item.dtype))


def _merge_one(item, *, inputs: MergeInputs, settings: MergeSettings, writer: StreamingWriter, rounding: Rounding,
               compute: torch.dtype, device: torch.device, normalize: str | None, step: int) -> None:
    _merge_in_chunks(inputs, item, settings, writer, rounding, compute, device, step, normalize)
